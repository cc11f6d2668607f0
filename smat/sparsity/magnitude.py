"""MAP: magnitude attention-based dynamic pruning (Back, Ahn & Kim, arXiv 2306.05056) on δ.

Magnitude attention A = |δ| / max|δ| (per tensor, or over all tensors with
`normalize="global"`). The kept set K is the top entries of |δ|; its size follows the cubic
schedule from all entries at `start` to `density` at `end`, refreshed every `every` steps.
  exploration (step < end)   mask = 1 on K, A elsewhere: pruned entries still act, scaled by A
                             (held constant), and so receive A-scaled gradients
  exploitation (step ≥ end)  mask = 1 on K, 0 elsewhere: only the survivors train
δ = 0 start: before `start` the mask is all ones (a dense warm-up that gives |δ| its meaning).
NOTE: under Adam the backward A-scaling mostly cancels (Adam normalises per entry); the forward
scaling does not. The paper trains with SGD.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from smat.sparsity import common


class MAPState(NamedTuple):
  kept: dict  # {0, 1}: the current kept set K
  mask: dict


@dataclasses.dataclass(frozen=True)
class MAP:
  density: float = 0.1
  start: int = 10
  end: int = 40
  every: int = 5  # Δt
  normalize: str = "matrix"  # or "global"
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    if self.normalize not in ("matrix", "global"):
      raise ValueError(f"MAP normalize={self.normalize!r}: use 'matrix' or 'global'")

  def init(self, params, key) -> MAPState:
    del key
    ones = common.eligible_ones(params, self.exclude)
    return MAPState(ones, ones)

  def attention(self, params):
    """A = |δ| / max|δ| per tensor (or global); 0 where δ is all zero."""
    magnitude = jax.tree.map(jnp.abs, params)
    if self.normalize == "global":
      peak = jnp.max(jnp.stack([m.max() for m in jax.tree.leaves(magnitude)]))
      return jax.tree.map(lambda m: m / jnp.maximum(peak, 1e-12), magnitude)
    return jax.tree.map(lambda m: m / jnp.maximum(m.max(), 1e-12), magnitude)

  def update(self, state: MAPState, params, grads, step) -> MAPState:
    del grads
    in_window = (step >= self.start) & (step <= self.end)
    refresh = in_window & (((step - self.start) % self.every == 0) | (step == self.end))
    count = common.scheduled_count(params, self.density, step, self.start, self.end,
                                   self.exclude)
    kept = jax.lax.cond(
        refresh, lambda: common.top_k_mask(jax.tree.map(jnp.abs, params), count, self.exclude),
        lambda: state.kept)
    eligible = common.eligible_ones(params, self.exclude)
    exploring = step < self.end
    mask = jax.tree.map(lambda k, a, e: jnp.where(exploring, k + (1.0 - k) * a * e, k),
                        kept, self.attention(params), eligible)
    return MAPState(kept, mask)

  def mask(self, state: MAPState):
    return state.mask
