"""Per-expert sparsity control by a Lagrangian (one multiplier λ_k ≥ 0 per expert).

With ᾱ_k the task-averaged, detached interpolation weight of expert k, measured sparsity
sparsity_k (fraction of exactly-zero gates of the deterministic masks meta-test uses, so the
budget holds for the deployed model whatever the training noise), expected L0 E[L0]_k and
target τ:
  L_sparse = Σ_k ᾱ_k · stopgrad(λ_k) · (τ − 1 + E[L0]_k)     trains the gates
  L_lagr   = Σ_k ᾱ_k · λ_k · (sparsity_k − τ)                moves λ
Descending L_lagr in λ is gradient *ascent* on the violation τ − sparsity_k: λ grows while an
expert is denser than τ. Before each update λ_k is reset to 0 for every expert already sparser
than τ, and after it λ is projected onto λ ≥ 0 (the reset expert's own step would otherwise
take it below 0), so a satisfied expert feels no pressure. Only experts a task selects
(α_k > 0) are pushed by that task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reset(lam: jax.Array, sparsity: jax.Array, target: float) -> jax.Array:
  """λ with the entries of experts sparser than τ set to 0."""
  return jnp.where(sparsity > target, 0.0, lam)


def sparsity_loss(alpha: jax.Array, lam: jax.Array, expected_l0: jax.Array, target: float):
  """L_sparse: gradient to the gates only (α and λ detached)."""
  return jnp.sum(jax.lax.stop_gradient(alpha * lam) * (target - 1.0 + expected_l0))


def lagrangian(alpha: jax.Array, lam: jax.Array, sparsity: jax.Array, target: float):
  """L_lagr: gradient to λ only (α and the measured sparsity carry none)."""
  return jnp.sum(jax.lax.stop_gradient(alpha * (sparsity - target)) * lam)
