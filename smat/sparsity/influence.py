"""Influence-score sparse fine-tuning, PLATON form (Zhang et al., ICML 2022, arXiv 2206.12562).

Influence I = |δ ⊙ ∂L/∂δ| (first-order loss change of reverting an entry to its base value),
averaged over a window of `window` steps; at each window's end
  Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|,   score S = Ī·Ū
and the mask becomes the top entries of S under one global threshold, the kept fraction
following the cubic schedule from 1 at `start` to `density` at `end`. The first window end at or
after `end` prunes to exactly `density` and freezes the mask: the final phase trains only the
survivors.
δ = 0 start: I is 0 at δ = 0, so the mask stays dense until `start` (a dense warm-up), and the
first pruning uses the windows seen since.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from smat.sparsity import common


class InfluenceState(NamedTuple):
  window_sum: dict  # Σ I over the current window
  importance: dict  # Ī
  uncertainty: dict  # Ū
  mask: dict


@dataclasses.dataclass(frozen=True)
class Influence:
  density: float = 0.1
  start: int = 10
  end: int = 40
  window: int = 10  # ΔT
  beta1: float = 0.85
  beta2: float = 0.95
  exclude: tuple[str, ...] = ()

  def init(self, params, key) -> InfluenceState:
    del key
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return InfluenceState(zeros, zeros, zeros, common.eligible_ones(params, self.exclude))

  def update(self, state: InfluenceState, params, grads, step) -> InfluenceState:
    window_sum = jax.tree.map(lambda s, p, g: s + jnp.abs(p * g), state.window_sum, params, grads)
    window_end = (step + 1) % self.window == 0

    def new_scores():
      influence = jax.tree.map(lambda s: s / self.window, window_sum)
      importance = jax.tree.map(lambda i, ī: self.beta1 * ī + (1 - self.beta1) * i,
                                influence, state.importance)
      uncertainty = jax.tree.map(
          lambda i, ī, ū: self.beta2 * ū + (1 - self.beta2) * jnp.abs(i - ī),
          influence, importance, state.uncertainty)
      return jax.tree.map(jnp.zeros_like, window_sum), importance, uncertainty

    window_sum, importance, uncertainty = jax.lax.cond(
        window_end, new_scores, lambda: (window_sum, state.importance, state.uncertainty))
    prune = window_end & (step >= self.start) & (step < self.end + self.window)
    count = common.scheduled_count(params, self.density, step, self.start, self.end,
                                   self.exclude)
    mask = jax.lax.cond(
        prune,
        lambda: common.top_k_mask(jax.tree.map(jnp.multiply, importance, uncertainty), count,
                                  self.exclude),
        lambda: state.mask)
    return InfluenceState(window_sum, importance, uncertainty, mask)

  def mask(self, state: InfluenceState):
    return state.mask
