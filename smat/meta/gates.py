"""Hard-concrete gates (Louizos et al., 2018): the per-element masks z of SMAT's experts.

A gate is a stretched, clipped binary-concrete variable with location log_α:
  training   s = sigmoid((log u − log(1 − u) + log_α) / β),  u ~ U(0.5 − w, 0.5 + w)
  evaluation s = sigmoid(log_α)
  z = clip(s · (ζ − γ) + γ, 0, 1)
so z is exactly 0 or 1 with positive probability and differentiable in between.
`noise_half_width` w = 0.5 is the paper's full U(0, 1); the authors' code draws u from
0.5 ± 1e-6 (`REFERENCE_NOISE`), which makes training gates deterministic.
"""

from __future__ import annotations

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


def sample(key: jax.Array, log_alpha: jax.Array,
           noise_half_width: float = FULL_NOISE) -> jax.Array:
  """Training gates z ∈ [0, 1], reparameterised in log_α."""
  u = jax.random.uniform(key, log_alpha.shape, jnp.float32, 0.5 - noise_half_width,
                         0.5 + noise_half_width)
  u = jnp.clip(u, _EPS, 1.0 - _EPS)
  return _stretch(jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA))


def deterministic(log_alpha: jax.Array) -> jax.Array:
  """Evaluation gates: z = clip(sigmoid(log_α) · (ζ − γ) + γ, 0, 1)."""
  return _stretch(jax.nn.sigmoid(log_alpha))


def prob_nonzero(log_alpha: jax.Array) -> jax.Array:
  """P(z ≠ 0) = 1 − Q(0) = sigmoid(log_α − β · ln(−γ / ζ)) per gate: its expected L0."""
  return jnp.clip(jax.nn.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)), _EPS, 1.0 - _EPS)
