"""Image preprocessing and the meta-training augmentation, on device, as pure JAX functions.

Recipe (P>M>F / SMAT meta-training): random resized crop (scale 0.08–1, ratio 3/4–4/3), colour
jitter (brightness, contrast, saturation 0.4) and horizontal flip, then mean/std
normalisation. Each image gets its own key, so augmentation is a pure function of (key, batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)  # a tuple: a module-level array would start the backend on import


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  flip_prob: float = 0.5


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, 3] → float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  return (images - jnp.asarray(mean)) / jnp.asarray(std)


def random_resized_crop(key: jax.Array, image: jax.Array, scale, ratio,
                        out_size: int | None = None) -> jax.Array:
  """Crop a random box (area fraction ~ U(scale), log aspect ~ U(log ratio)), resize it to
  `out_size` × `out_size` (default: back to the image's size; DINO's local crops are smaller)."""
  size = image.shape[0]
  out = size if out_size is None else out_size
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, minval=scale[0], maxval=scale[1])
  log_r = jax.random.uniform(k_ratio, minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_r)
  width = jnp.clip(jnp.sqrt(area * aspect), 1.0 / size, 1.0) * size
  height = jnp.clip(jnp.sqrt(area / aspect), 1.0 / size, 1.0) * size
  top = jax.random.uniform(k_y) * (size - height)
  left = jax.random.uniform(k_x) * (size - width)
  zoom = jnp.array([out / height, out / width])
  return jax.image.scale_and_translate(
      image, (out, out) + image.shape[2:], (0, 1), zoom, -jnp.array([top, left]) * zoom,
      method="linear", antialias=True)


def color_jitter(key: jax.Array, image: jax.Array, brightness: float, contrast: float,
                 saturation: float) -> jax.Array:
  """Brightness, contrast and saturation factors ~ U[1 − s, 1 + s], applied in that order."""
  kb, kc, ks = jax.random.split(key, 3)
  factor = lambda k, s: jax.random.uniform(k, minval=1 - s, maxval=1 + s)
  image = jnp.clip(image * factor(kb, brightness), 0, 1)
  gray_mean = (image @ jnp.asarray(_LUMA)).mean()
  image = jnp.clip((image - gray_mean) * factor(kc, contrast) + gray_mean, 0, 1)
  gray = (image @ jnp.asarray(_LUMA))[..., None]
  return jnp.clip((image - gray) * factor(ks, saturation) + gray, 0, 1)


def augment_image(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
  """One float image [H, W, 3] in [0, 1] → augmented, still in [0, 1]."""
  k_crop, k_color, k_flip = jax.random.split(key, 3)
  image = random_resized_crop(k_crop, image, config.crop_scale, config.crop_ratio)
  image = color_jitter(k_color, image, config.brightness, config.contrast, config.saturation)
  flip = jax.random.bernoulli(k_flip, config.flip_prob)
  return jnp.where(flip, image[:, ::-1], image)


def augment(key: jax.Array, images: jax.Array, config: AugmentConfig = AugmentConfig()) -> jax.Array:
  """Batch [..., H, W, 3] in [0, 1]: independent augmentation per image."""
  flat = images.reshape((-1,) + images.shape[-3:])
  keys = jax.random.split(key, flat.shape[0])
  out = jax.vmap(augment_image, in_axes=(0, 0, None))(keys, flat, config)
  return out.reshape(images.shape)


def augment_each(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """Batch [N, H, W, 3] (uint8 or [0, 1] float) → augmented float in [0, 1], image i drawing
  from fold_in(key, i): padding a batch leaves the real images' draws alone."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
  floats = to_float(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
  return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, floats, config)


def augment_episode(key: jax.Array, episode, config: AugmentConfig):
  """A meta-training episode with its support and query images augmented independently
  (P>M>F's recipe applies the training transform to every image of the episode)."""
  k_support, k_query = jax.random.split(key)
  return episode._replace(support_images=augment_each(k_support, episode.support_images, config),
                          query_images=augment_each(k_query, episode.query_images, config))


def _brightness_saturation_contrast(key: jax.Array, image: jax.Array) -> jax.Array:
  """DiffAugment colour on one normalised image: +U(−½, ½), saturation ×U(0, 2), contrast
  ×U(½, 1½) about the channel and the image mean."""
  u = jax.random.uniform(key, (3,))
  image = image + (u[0] - 0.5)
  channel_mean = image.mean(-1, keepdims=True)
  image = (image - channel_mean) * (2.0 * u[1]) + channel_mean
  mean = image.mean()
  return (image - mean) * (u[2] + 0.5) + mean


def _translate(key: jax.Array, image: jax.Array, ratio: float) -> jax.Array:
  """Integer shift by up to round(ratio · size) pixels per axis, zero-filled."""
  size_h, size_w = image.shape[:2]
  reach_h, reach_w = int(size_h * ratio + 0.5), int(size_w * ratio + 0.5)
  k_h, k_w = jax.random.split(key)
  dy = jax.random.randint(k_h, (), -reach_h, reach_h + 1)
  dx = jax.random.randint(k_w, (), -reach_w, reach_w + 1)
  padded = jnp.pad(image, ((reach_h, reach_h), (reach_w, reach_w), (0, 0)))
  return jax.lax.dynamic_slice(padded, (reach_h + dy, reach_w + dx, 0), image.shape)


def support_augment(key: jax.Array, images: jax.Array, prob: float = 0.9,
                    translation: float = 0.125) -> jax.Array:
  """Fine-tuning augmentation of a normalised support batch [N, H, W, 3] (DiffAugment
  'color,translation' as P>M>F and SMAT use it at meta-test).

  With probability `prob` (one draw for the batch): flip the whole batch horizontally with
  probability ½, then per image colour (brightness, saturation, contrast) and a translation of
  up to `translation` × size with zero (= mean colour) fill; otherwise the batch is unchanged.
  """
  k_apply, k_flip, k_color, k_shift = jax.random.split(key, 4)
  # Image i's keys depend on i only: padding the batch leaves the real images' draws alone.
  per_image = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(images.shape[0]))
  flipped = jnp.where(jax.random.bernoulli(k_flip), images[:, :, ::-1], images)
  colored = jax.vmap(_brightness_saturation_contrast)(per_image(k_color), flipped)
  shifted = jax.vmap(_translate, (0, 0, None))(per_image(k_shift), colored, translation)
  return jnp.where(jax.random.bernoulli(k_apply, prob), shifted, images)
