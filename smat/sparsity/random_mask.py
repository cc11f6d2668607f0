"""Random masks: the floor every strategy must beat.

`density` of the eligible entries, drawn uniformly without replacement (exactly
`kept_count` ones), fixed for the whole run and reproducible from the key. No score, so the
δ = 0 start needs no warm-up.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from smat.sparsity import common


class RandomState(NamedTuple):
  mask: dict


@dataclasses.dataclass(frozen=True)
class Random:
  density: float = 0.1
  exclude: tuple[str, ...] = ()

  def init(self, params, key) -> RandomState:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    scores = jax.tree.unflatten(treedef, [jax.random.uniform(k, p.shape)
                                          for k, p in zip(keys, leaves)])
    kept = common.kept_count(params, self.density, self.exclude)
    return RandomState(common.top_k_mask(scores, kept, self.exclude))

  def update(self, state: RandomState, params, grads, step) -> RandomState:
    del params, grads, step
    return state

  def mask(self, state: RandomState):
    return state.mask
