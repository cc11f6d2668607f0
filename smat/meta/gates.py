"""Hard-concrete gates (Louizos et al., 2018): the per-element masks z of SMAT's experts.

A gate is a stretched, clipped binary-concrete variable with location log_α:
  training   s = sigmoid((log u − log(1 − u) + log_α) / β),  u ~ U(0.5 − w, 0.5 + w)
  evaluation s = sigmoid(log_α)
  z = clip(s · (ζ − γ) + γ, 0, 1)
so z is exactly 0 or 1 with positive probability and differentiable in between.
`noise_half_width` w = 0.5 is the paper's full U(0, 1); the authors' code draws u from
0.5 ± 1e-6 (`REFERENCE_NOISE`, the default: it produced the paper's numbers), which makes
training gates deterministic at temperature β — still not the evaluation gate: a gate is 0 in
training iff log_α < β · logit(1/12) ≈ −1.60, at meta-test iff log_α < logit(1/12) ≈ −2.40.
Whatever the noise, the sparsity budget is measured on `deterministic` (smat.meta.step).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BETA, ZETA, GAMMA = 2.0 / 3.0, 1.1, -0.1
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
FULL_NOISE = 0.5  # u ~ U(0, 1)
REFERENCE_NOISE = 1e-6  # the authors' code
_EPS = 1e-6


def clamp(log_alpha: jax.Array) -> jax.Array:
  """log_α clamped to [ln 0.01, ln 100] (applied to the stored values after every update)."""
  return jnp.clip(log_alpha, LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def _stretch(s: jax.Array) -> jax.Array:
  return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _concrete(key: jax.Array, log_alpha: jax.Array, noise_half_width: float) -> jax.Array:
  """s = sigmoid((log u − log(1 − u) + log_α) / β): the binary-concrete sample before stretching."""
  u = jax.random.uniform(key, log_alpha.shape, jnp.float32, 0.5 - noise_half_width,
                         0.5 + noise_half_width)
  u = jnp.clip(u, _EPS, 1.0 - _EPS)
  return jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)


def sample(key: jax.Array, log_alpha: jax.Array,
           noise_half_width: float = FULL_NOISE) -> jax.Array:
  """Training gates z ∈ [0, 1], reparameterised in log_α."""
  return _stretch(_concrete(key, log_alpha, noise_half_width))


def _over_experts(alpha: jax.Array, z: jax.Array) -> jax.Array:
  """α [M] shaped to broadcast against z [M, *G]."""
  return alpha.reshape(alpha.shape + (1,) * (z.ndim - 1))


def _sum_per_expert(x: jax.Array) -> jax.Array:
  """[M, *G] → [M]."""
  return x.reshape(x.shape[0], -1).sum(-1)


def weighted_sum(alpha: jax.Array, z: jax.Array) -> jax.Array:
  """Σ_k α_k z_k over the leading axis, as a reduction (which fuses with z's producer; a
  tensordot is a matrix product and needs z in memory first)."""
  return (_over_experts(alpha, z) * z).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sample_and_merge(key: jax.Array, log_alpha: jax.Array, alpha: jax.Array,
                     noise_half_width: float = FULL_NOISE):
  """(m = Σ_k α_k z_k, non-zero gates per expert [M] as float) for z = `sample(key, log_α)`.

  The same values as sampling then merging, without keeping z [M, *G] for the backward pass:
  it draws the same noise again from `key` and recomputes z, so each step reads the M gate
  tensors once forward and once backward and stores none (the counts have zero gradient).
  """
  z = sample(key, log_alpha, noise_half_width)
  return weighted_sum(alpha, z), _sum_per_expert(z != 0).astype(jnp.float32)


def _sample_and_merge_fwd(key, log_alpha, alpha, noise_half_width):
  return sample_and_merge(key, log_alpha, alpha, noise_half_width), (key, log_alpha, alpha)


def _sample_and_merge_bwd(noise_half_width, residuals, cotangents):
  key, log_alpha, alpha = residuals
  g_merged, _ = cotangents
  s = _concrete(key, log_alpha, noise_half_width)
  z = _stretch(s)
  # dz/dlog_α: the clip passes the gradient strictly inside (0, 1); sigmoid' = s (1 − s).
  dz = jnp.where((z > 0.0) & (z < 1.0), (ZETA - GAMMA) / BETA * s * (1.0 - s), 0.0)
  return None, g_merged[None] * _over_experts(alpha, z) * dz, _sum_per_expert(g_merged[None] * z)


sample_and_merge.defvjp(_sample_and_merge_fwd, _sample_and_merge_bwd)


def deterministic(log_alpha: jax.Array) -> jax.Array:
  """Evaluation gates: z = clip(sigmoid(log_α) · (ζ − γ) + γ, 0, 1)."""
  return _stretch(jax.nn.sigmoid(log_alpha))


def prob_nonzero(log_alpha: jax.Array) -> jax.Array:
  """P(z ≠ 0) = 1 − Q(0) = sigmoid(log_α − β · ln(−γ / ζ)) per gate: its expected L0."""
  return jnp.clip(jax.nn.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)), _EPS, 1.0 - _EPS)
