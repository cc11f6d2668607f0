"""An image folder `root/<class>/<image>`: the way users bring their own data.

Every class is a test class (evaluation only). Images are checked when the folder is scanned so
that a corrupt file is named up front, not in the middle of an evaluation.

What counts as an image is the same here and in `smat embed` (`image_files`): files with an
image suffix anywhere under the folder (sub-folders included), hidden files and folders (names
starting with ".", such as macOS `._*` resource forks) skipped. A class folder that is a symbolic
link to another class folder of the same root is skipped (it would count the same images twice
as a second class); a link to a folder elsewhere is a class like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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


# What PIL raises for a file it cannot decode; DecompressionBombError (an image of more than
# 2 × Image.MAX_IMAGE_PIXELS pixels) is none of the others.
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
              Image.DecompressionBombError)


def image_files(directory: str | Path) -> list[Path]:
  """Image files under `directory` (recursively, not following links to sub-folders), sorted;
  hidden files and folders skipped."""
  found = []
  for parent, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found.extend(Path(parent) / f for f in files
                 if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
  return sorted(p for p in found if p.is_file())


def _readable(path: Path) -> bool:
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except UNREADABLE:
    return False


def _class_dirs(base: Path) -> list[Path]:
  """Visible sub-folders of `base`, without links to another of them."""
  dirs = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
  real = {p.resolve() for p in dirs if not p.is_symlink()}
  kept = []
  for p in dirs:
    if p.is_symlink() and p.resolve() in real:
      logging.warning("folder:%s: %s links to another class folder; skipped", base, p.name)
      continue
    kept.append(p)
  return kept


def load(root: str, skip_corrupt: bool = False, grouped: bool = False) -> Domain:
  """Scan `root/<class>/*` (`grouped`: `root/<group>/<class>/*`) into a domain, every class a
  test class (`smat.data.class_split` assigns others); a corrupt image is an error unless
  `skip_corrupt`."""
  base = Path(root)
  layout = "root/<group>/<class>/<images>" if grouped else "root/<class>/<images>"
  if not base.is_dir():
    raise DataError(f"folder:{root}: directory does not exist (expected {layout})")
  class_dirs = ([c for g in _class_dirs(base) for c in _class_dirs(g)] if grouped
                else _class_dirs(base))
  if not class_dirs:
    raise DataError(f"folder:{root}: no class sub-folders (expected {layout})")
  paths: list[str] = []
  classes: list[ImageClass] = []
  skipped: list[str] = []
  for class_dir in class_dirs:
    files = image_files(class_dir)
    good = []
    for path in files:
      if _readable(path):
        good.append(path)
      elif skip_corrupt:
        skipped.append(str(path))
      else:
        raise DataError(f"{path}: unreadable or corrupt image, or one over PIL's "
                        f"{2 * (Image.MAX_IMAGE_PIXELS or 0)}-pixel limit; fix or delete it, or "
                        f"pass --skip-corrupt to skip such files")
    if not good:
      raise DataError(f"{class_dir}: class folder has no readable images "
                      f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
    ids = np.arange(len(paths), len(paths) + len(good), dtype=np.int64)
    paths.extend(str(p) for p in good)
    group = class_dir.parent.name if grouped else ""
    classes.append(ImageClass(name=f"{group}/{class_dir.name}" if grouped else class_dir.name,
                              image_ids=ids, group=group))
  if skipped:
    logging.warning("folder:%s: skipped %d corrupt image(s), e.g. %s", root, len(skipped), skipped[0])
  return Domain(name=f"folder:{root}", splits={"train": (), "val": (), "test": tuple(classes)},
                read=FileReader(tuple(paths)),
                metadata={"source": "folder", "path": str(base.resolve()),
                          "skipped_corrupt": len(skipped)})
