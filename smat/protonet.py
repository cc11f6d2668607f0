"""The non-parametric ProtoNet head on padded episodes: masked prototypes, cosine logits, loss.

Shapes: features [N, D], labels [N] int, mask [N] bool, class_mask [W] bool.
Padded entries (mask False) and padded classes (class_mask False) change nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

COSINE_SCALE = 10.0
_NEG = -1e9


def prototypes(features: jax.Array, labels: jax.Array, mask: jax.Array, ways: int) -> jax.Array:
  """Masked class means [W, D]; classes without support get zeros."""
  onehot = jax.nn.one_hot(labels, ways, dtype=features.dtype) * mask[:, None].astype(features.dtype)
  counts = onehot.sum(0)[:, None]
  return (onehot.T @ features) / jnp.maximum(counts, 1.0)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps) along `axis`; zero vectors stay zero and get finite gradients.

  NOTE: written with rsqrt of the clamped squared norm, because the gradient of `norm` at a
  zero vector (a padded class's prototype) is NaN even where `maximum` picks eps.
  """
  squared = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def cosine_logits(features: jax.Array, protos: jax.Array, class_mask: jax.Array,
                  scale: float = COSINE_SCALE) -> jax.Array:
  """scale · cos(feature, prototype) [N, W]; padded classes get a large negative logit."""
  return jnp.where(class_mask[None, :],
                   scale * l2_normalize(features) @ l2_normalize(protos).T, _NEG)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over the valid rows."""
  losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  weights = mask.astype(logits.dtype)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Fraction of valid rows whose arg-max is the label."""
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
  return correct.sum() / jnp.maximum(mask.sum(), 1)
