"""The one interface every data source implements.

A *domain* is a set of classes, each a list of images, with a train/val/test class split.
Sources differ only in how an image id becomes pixels, so a domain is plain data plus a
picklable `read(image_id) -> uint8 [H, W, 3]` callable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smat.errors import DataError

SPLITS = ("pool", "train", "val", "test")  # pool: θ_pre's classes (pre-training only)


@dataclasses.dataclass(frozen=True)
class ImageClass:
  """One class: its name, an optional group (script/alphabet) and its image ids."""

  name: str
  image_ids: np.ndarray  # [n] int64, understood by the domain's reader
  group: str = ""

  @property
  def size(self) -> int:
    return len(self.image_ids)


def leaf_spans(hierarchy: Mapping[str, Sequence[str]], names: Sequence[str]) -> tuple[np.ndarray, ...]:
  """Per internal node of a DAG (node → children), the positions in `names` of the leaves
  under it; nodes over none of `names` are left out. Sorted by node, so a pure function."""
  memo: dict[str, frozenset[str]] = {}

  def leaves(node: str) -> frozenset[str]:
    if node not in memo:
      children = hierarchy.get(node, ())
      memo[node] = (frozenset().union(*(leaves(c) for c in children)) if children
                    else frozenset((node,)))
    return memo[node]

  position = {name: i for i, name in enumerate(names)}
  spans = []
  for node in sorted(n for n, children in hierarchy.items() if children):
    under = sorted(position[leaf] for leaf in leaves(node) if leaf in position)
    if under:
      spans.append(np.asarray(under, np.int64))
  return tuple(spans)


@dataclasses.dataclass(frozen=True)
class Domain:
  """Classes split into train/val/test, and the reader that turns image ids into pixels.

  `read` must return uint8 RGB [H, W, 3]; image sizes may differ between images. `hierarchy`
  is an optional class DAG (node → children; the leaves are class names, e.g. ImageNet's
  WordNet graph): Meta-Dataset episodes then draw their classes under one node of it.
  """

  name: str
  splits: Mapping[str, tuple[ImageClass, ...]]
  read: Callable[[int], np.ndarray]
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  hierarchy: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  _spans: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def classes(self, split: str) -> tuple[ImageClass, ...]:
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {SPLITS}")
    return self.splits.get(split, ())

  def spans(self, split: str) -> tuple[np.ndarray, ...] | None:
    """Positions of the `split` classes under each hierarchy node (None without a hierarchy);
    computed once per split."""
    if not self.hierarchy:
      return None
    if split not in self._spans:
      self._spans[split] = leaf_spans(self.hierarchy, [c.name for c in self.classes(split)])
    return self._spans[split]

  def describe(self) -> dict[str, Any]:
    """Classes per split and images per class (min/median/max), plus source metadata."""
    per_split = {}
    for split in SPLITS:
      classes = self.classes(split)
      sizes = np.array([c.size for c in classes], dtype=np.int64)
      groups = sorted({c.group for c in classes if c.group})
      per_split[split] = {
          "num_classes": len(classes),
          "num_images": int(sizes.sum()),
          "images_per_class": (
              {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}
              if len(sizes) else None),
          "groups": groups,
      }
    return {
        "name": self.name,
        "num_classes": sum(s["num_classes"] for s in per_split.values()),
        "num_images": sum(s["num_images"] for s in per_split.values()),
        "splits": per_split,
        "metadata": dict(self.metadata),
    }


def to_rgb(image: Image.Image) -> np.ndarray:
  """Any PIL image (grayscale, palette, RGBA, CMYK, 16-bit) → uint8 RGB array [H, W, 3].

  Transparent pixels are composited onto white, which is what a viewer shows.
  """
  if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  elif image.mode == "I;16" or image.mode == "I":
    array = np.asarray(image, dtype=np.float64)
    span = max(array.max() - array.min(), 1.0)
    image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def gray_to_rgb(array: np.ndarray) -> np.ndarray:
  """uint8 [H, W] → uint8 [H, W, 3]."""
  return np.repeat(array[..., None], 3, axis=-1)


# The share of an ID source's training classes kept for pre-training θ_pre (the `pool` split),
# so that no class whose labels θ_pre learnt is met again in meta-training: the paper's θ_pre
# (DINO on ImageNet) never saw Meta-Dataset's episodes either.
POOL_SHARE_OF_TRAIN = 0.5


def split_classes_by_fraction(
    classes: Sequence[ImageClass], fractions: tuple[float, float, float], seed: int | list[int],
    pool_share: float = POOL_SHARE_OF_TRAIN,
) -> dict[str, tuple[ImageClass, ...]]:
  """Seeded permutation of `classes` cut into train/val/test by `fractions`, then the first
  `pool_share` of the train block set apart as the `pool` split (θ_pre's classes). val and test
  do not depend on `pool_share`."""
  order = np.random.default_rng(seed).permutation(len(classes))
  n_train = int(round(fractions[0] * len(classes)))
  n_val = int(round(fractions[1] * len(classes)))
  n_pool = int(round(pool_share * n_train))
  picked = [classes[i] for i in order]
  return {
      "pool": tuple(picked[:n_pool]),
      "train": tuple(picked[n_pool:n_train]),
      "val": tuple(picked[n_train:n_train + n_val]),
      "test": tuple(picked[n_train + n_val:]),
  }


def split_classes_by_count(
    classes: Sequence[ImageClass], counts: tuple[int, int, int]
) -> dict[str, tuple[ImageClass, ...]]:
  """Contiguous train/val/test blocks of `counts` classes (Meta-Dataset's convention)."""
  if sum(counts) != len(classes):
    raise DataError(
        f"class split {counts} needs {sum(counts)} classes but the source has {len(classes)}")
  a, b = counts[0], counts[0] + counts[1]
  return {"train": tuple(classes[:a]), "val": tuple(classes[a:b]), "test": tuple(classes[b:])}


def write_build(out: Path, images: np.ndarray, metadata: dict) -> None:
  """A built source's `images.npy` and `metadata.json` into `out`, all or nothing: written in a
  staging folder beside it and renamed into place, `metadata.json` last, so its presence means
  the build is complete (an incomplete earlier build is replaced)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
  try:
    np.save(staging / "images.npy", images)
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
    if out.exists():
      shutil.rmtree(out)  # an incomplete earlier build (no metadata.json)
    os.replace(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class BuildReader:
  """Picklable reader of a built source's `images.npy`: image id → uint8 RGB. `ink`: the build
  holds grayscale ink (0 = paper), read back as a black drawing on white."""

  path: str
  ink: bool = False

  @functools.cached_property
  def images(self) -> np.ndarray:
    return np.load(self.path, mmap_mode="r")

  def __call__(self, image_id: int) -> np.ndarray:
    if self.ink:
      return gray_to_rgb(255 - np.asarray(self.images[image_id]))
    return np.array(self.images[image_id])

  def __reduce__(self):  # pickle the path, not the memory map
    return BuildReader, (self.path, self.ink)


def find_build(data_dir: str | os.PathLike, source: str, what: str,
               default: Path | None = None) -> Path:
  """The build that `<source>:` specs read: $SMAT_<SOURCE>_BUILD; else `default` (the
  default config's build) when it is finished; else the only finished build in
  `<data_dir>/<source>`. `what` names the source in errors ("icons domain")."""
  variable = f"SMAT_{source.upper()}_BUILD"
  if os.environ.get(variable):
    path = Path(os.environ[variable])
    if not (path / "metadata.json").exists():
      raise DataError(f"{variable}={path}: not a finished {source} build (no metadata.json)")
    return path
  if default is not None and (default / "metadata.json").exists():
    return default
  root = Path(data_dir) / source
  builds = sorted(p for p in root.glob("s*-*") if (p / "metadata.json").exists())
  if len(builds) == 1:
    return builds[0]
  if builds:
    raise DataError(f"several {source} builds in {root} ({', '.join(p.name for p in builds)}); "
                    f"choose one with {variable}=<dir>")
  raise DataError(f"{what} not built in {root}: run `smat data prepare {source} "
                  f"--data-dir {data_dir}` first")
