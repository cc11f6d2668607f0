"""Backbone features of an image folder: `smat embed` (feature extraction, linear probes, and the
simplest end-to-end check of an imported backbone).

Preprocessing is the backbone's own: RGB, resized (bicubic, shorter side to the input size, then
centre-cropped) only when an image is not already at that size, then the mean/std the backbone
was trained with (ImageNet's for DINO).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from smat.data.domain import to_rgb
from smat.data.sources.folder import IMAGE_SUFFIXES, UNREADABLE, image_files
from smat.errors import DataError
from smat.models import vit


def image_paths(root: str) -> list[str]:
  """Image files under `root` (recursively, as `folder:` domains see them), as sorted paths
  relative to it."""
  base = Path(root)
  if not base.is_dir():
    raise DataError(f"--images {root}: not a directory")
  paths = sorted(str(p.relative_to(base)) for p in image_files(base))
  if not paths:
    raise DataError(f"--images {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
  return paths


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 RGB [size, size, 3]; untouched when already that size."""
  try:
    with Image.open(path) as image:
      pixels = to_rgb(image)  # handles alpha, palettes, 16-bit and CMYK the same at any size
  except UNREADABLE as e:
    raise DataError(f"{path}: unreadable image ({e}); remove or replace it") from None
  height, width = pixels.shape[:2]
  if (height, width) == (size, size):
    return pixels
  scale = size / min(height, width)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  image = Image.fromarray(pixels).resize((new_w, new_h), Image.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


@functools.partial(jax.jit, static_argnums=2)
def embed_images(params, images, config: vit.ViTConfig) -> jax.Array:
  """uint8 images [B, S, S, 3] → CLS features [B, width], with the backbone's preprocessing."""
  return vit.forward(params, vit.preprocess(images, config), config)


def embed_all(params, config: vit.ViTConfig, load: Callable[[int], np.ndarray], count: int,
              image_size: int, batch_size: int = 64, progress: bool = False) -> np.ndarray:
  """Features [count, width] of images `load(0) … load(count − 1)` (uint8 [S, S, 3] each).

  Every batch is padded to `batch_size`, so the whole run compiles once.
  """
  from tqdm.auto import tqdm

  chunks = []
  for start in tqdm(range(0, count, batch_size), desc="embed", unit="batch",
                    disable=not progress):
    n = min(batch_size, count - start)
    images = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    for i in range(n):
      images[i] = load(start + i)
    chunks.append(np.asarray(embed_images(params, images, config))[:n])
  return np.concatenate(chunks)


def embed_folder(params, config: vit.ViTConfig, root: str, image_size: int | None = None,
                 batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, list[str]]:
  """(features float32 [N, width], sorted relative paths) of every image under `root`."""
  size = image_size or config.image_size
  paths = image_paths(root)
  load = lambda i: load_image(str(Path(root) / paths[i]), size)
  features = embed_all(params, config, load, len(paths), size, batch_size, progress)
  bad = np.flatnonzero(~np.isfinite(features).all(1))
  if bad.size:
    raise DataError(f"{Path(root) / paths[bad[0]]}: non-finite features (NaN/Inf) for {bad.size} "
                    f"of {len(paths)} images; the backbone's weights or numerics are broken "
                    f"(try backbone dtype float32) — nothing was written")
  return features, paths
