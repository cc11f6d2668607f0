"""Backbone features of an image folder: `smat embed` (feature extraction, linear probes, and the
simplest end-to-end check of an imported backbone).

Preprocessing is the backbone's own: RGB, resized (bicubic, shorter side to the input size, then
centre-cropped) only when an image is not already at that size, then the mean/std the backbone
was trained with (ImageNet's for DINO).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from smat.data.domain import to_rgb
from smat.data.sources.folder import IMAGE_SUFFIXES
from smat.errors import DataError
from smat.models import vit


def image_paths(root: str) -> list[str]:
  """Image files under `root` (recursively), as sorted paths relative to it."""
  base = Path(root)
  if not base.is_dir():
    raise DataError(f"--images {root}: not a directory")
  paths = sorted(str(p.relative_to(base)) for p in base.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise DataError(f"--images {root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
  return paths


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 RGB [size, size, 3]; untouched when already that size."""
  try:
    with Image.open(path) as image:
      pixels = to_rgb(image)  # handles alpha, palettes, 16-bit and CMYK the same at any size
  except (OSError, SyntaxError, ValueError) as e:
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
def _features(params, images, config: vit.ViTConfig):
  return vit.forward(params, vit.preprocess(images, config), config)


def embed_folder(params, config: vit.ViTConfig, root: str, image_size: int | None = None,
                 batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, list[str]]:
  """(features float32 [N, width], sorted relative paths) of every image under `root`."""
  from tqdm.auto import tqdm

  size = image_size or config.image_size
  paths = image_paths(root)
  chunks = []
  for start in tqdm(range(0, len(paths), batch_size), desc="embed", unit="batch",
                    disable=not progress):
    names = paths[start:start + batch_size]
    images = np.zeros((batch_size, size, size, 3), np.uint8)  # fixed shape: one compile
    for i, name in enumerate(names):
      images[i] = load_image(str(Path(root) / name), size)
    chunks.append(np.asarray(_features(params, images, config))[:len(names)])
  return np.concatenate(chunks), paths
