"""An image folder `root/<class>/<image>`: the way users bring their own data.

Every class is a test class (evaluation only). Images are checked when the folder is scanned so
that a corrupt file is named up front, not in the middle of an evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from smat.data.domain import Domain, ImageClass, to_rgb
from smat.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})


@dataclasses.dataclass(frozen=True)
class FileReader:
  """Image id → RGB pixels of `paths[id]`."""

  paths: tuple[str, ...]

  def __call__(self, image_id: int) -> np.ndarray:
    with Image.open(self.paths[image_id]) as image:
      return to_rgb(image)


def _readable(path: Path) -> bool:
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
    return False


def load(root: str, skip_corrupt: bool = False) -> Domain:
  """Scan `root/<class>/*` into a domain; a corrupt image is an error unless `skip_corrupt`."""
  base = Path(root)
  if not base.is_dir():
    raise DataError(f"folder:{root}: directory does not exist (expected root/<class>/<images>)")
  class_dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not class_dirs:
    raise DataError(f"folder:{root}: no class sub-folders (expected root/<class>/<images>)")
  paths: list[str] = []
  classes: list[ImageClass] = []
  skipped: list[str] = []
  for class_dir in class_dirs:
    files = sorted(p for p in class_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    good = []
    for path in files:
      if _readable(path):
        good.append(path)
      elif skip_corrupt:
        skipped.append(str(path))
      else:
        raise DataError(f"{path}: unreadable or corrupt image; fix or delete it, or pass "
                        f"--skip-corrupt to skip such files")
    if not good:
      raise DataError(f"{class_dir}: class folder has no readable images "
                      f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
    ids = np.arange(len(paths), len(paths) + len(good), dtype=np.int64)
    paths.extend(str(p) for p in good)
    classes.append(ImageClass(name=class_dir.name, image_ids=ids))
  if skipped:
    logging.warning("folder:%s: skipped %d corrupt image(s), e.g. %s", root, len(skipped), skipped[0])
  return Domain(name=f"folder:{root}", splits={"train": (), "val": (), "test": tuple(classes)},
                read=FileReader(tuple(paths)),
                metadata={"source": "folder", "path": str(base.resolve()),
                          "skipped_corrupt": len(skipped)})
