"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: a real-image OOD domain.

All 10 classes are test classes (OOD evaluation only); images are the 10,000-image test set.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from pathlib import Path

import numpy as np

from smat.data.domain import Domain, ImageClass, gray_to_rgb
from smat.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle_boot")


def read_idx(path: Path) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): magic 0x0000 <dtype=0x08> <ndim>, big-endian dims."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
  ndim = data[3]
  dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
  body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise DataError(f"{path}: truncated IDX file ({body.size} bytes for shape {tuple(dims)})")
  return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
  for name in (f"{stem}.gz", stem):
    if (directory / name).exists():
      return directory / name
  raise DataError(f"fashion_mnist: {directory / stem}[.gz] not found; install it with "
                  f"`apt-get install {PACKAGE}` (or set SMAT_FASHION_MNIST_DIR)")


@dataclasses.dataclass(frozen=True)
class ArrayReader:
  """Image id → RGB from an [N, H, W] uint8 array loaded lazily from IDX."""

  path: str

  @functools.cached_property
  def images(self) -> np.ndarray:
    return read_idx(Path(self.path))

  def __call__(self, image_id: int) -> np.ndarray:
    return gray_to_rgb(self.images[image_id])

  def __reduce__(self):
    return ArrayReader, (self.path,)


def load(directory: str | None = None) -> Domain:
  directory = Path(directory or DEFAULT_DIR)
  images_path = _find(directory, "t10k-images-idx3-ubyte")
  labels = read_idx(_find(directory, "t10k-labels-idx1-ubyte"))
  classes = tuple(
      ImageClass(name=name, image_ids=np.flatnonzero(labels == k).astype(np.int64))
      for k, name in enumerate(CLASS_NAMES))
  return Domain(name="fashion_mnist", splits={"train": (), "val": (), "test": classes},
                read=ArrayReader(str(images_path)),
                metadata={"source": "fashion_mnist", "path": str(directory), "image_size": 28})
