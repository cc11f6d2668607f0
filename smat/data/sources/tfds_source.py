"""TensorFlow Datasets through TFDS's random-access `data_source` (no TensorFlow needed).

SPEC forms:
* `tfds:<name>[:<split>]` — any TFDS dataset as an evaluation domain: every class is a test
  class; images come from `<split>` (default: `test`, else `train`).
* `tfds:<md_source>` — a Meta-Dataset source name (protocol.md's table). Sources that core TFDS
  has are read from that builder with Meta-Dataset's train/val/test class *counts*; the class
  assignment is a seeded permutation (Omniglot: the evaluation alphabets are the test classes,
  as in Meta-Dataset), not Meta-Dataset's own lists — for those use the
  `meta_dataset/<source>` builders or `md_h5:` files. Sources core TFDS lacks (aircraft, fungi,
  traffic_sign, mscoco) are read from the `meta_dataset/<source>` builder.
* `tfds:meta_dataset/<source>` — the Meta-Dataset project's own TFDS builders (one split
  `all_classes`, labels ordered train → valid → test), read from `<data_dir>` without needing
  the builder code installed. `meta_dataset/ilsvrc_2012` also gives the domain ImageNet's
  class hierarchy, from the dataset spec in the prepared builder's `metadata.json`
  (`md_spec`), so that episodes draw their classes under one node of it.

The label scan (which record belongs to which class) decodes every record once and is cached
next to the data as `<data_dir>/smat_index/<name>__<split>.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from smat.data.domain import Domain, ImageClass, split_classes_by_count, to_rgb
from smat.data.sources import md_spec
from smat.errors import DataError, require

# Meta-Dataset source → (core TFDS builder or None, TFDS splits to merge, (train, val, test)).
MD_SOURCES: dict[str, tuple[str | None, tuple[str, ...], tuple[int, int, int]]] = {
    "ilsvrc_2012": ("imagenet2012", ("train",), (712, 158, 130)),
    "omniglot": ("omniglot", ("train", "test"), (883, 81, 659)),
    "aircraft": (None, (), (70, 15, 15)),
    "cu_birds": ("caltech_birds2011", ("train", "test"), (140, 30, 30)),
    "dtd": ("dtd", ("train", "validation", "test"), (33, 7, 7)),
    "quickdraw": ("quickdraw_bitmap", ("train",), (241, 52, 52)),
    "fungi": (None, (), (994, 200, 200)),
    "vgg_flower": ("oxford_flowers102", ("train", "validation", "test"), (71, 15, 16)),
    "traffic_sign": (None, (), (0, 0, 43)),
    "mscoco": (None, (), (0, 40, 40)),
}
ID_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi",
              "vgg_flower")
_ID_STRIDE = 1 << 40  # image id = split position · stride + record index


def _tfds():
  # A heavy import, only when a TFDS domain is used.
  return require("tensorflow_datasets", "tfds", "tfds: domains")


def _versions(name: str, data_dir: str | None) -> tuple[Path, list[Path]]:
  """(data root, prepared version directories of builder `name`, oldest first)."""
  root = Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
  return root, sorted((root / name).glob("*.*.*"),
                      key=lambda p: tuple(int(x) if x.isdigit() else -1 for x in p.name.split(".")))


def md_hierarchy(md_source: str, data_dir: str | None, labels) -> dict[str, tuple[str, ...]]:
  """Class DAG of a `meta_dataset/<md_source>` builder whose spec has one (ImageNet), leaves
  named as `_classes` names them (`<md_source>/<label>`, label = class id); {} otherwise."""
  _, versions = _versions(f"meta_dataset/{md_source}", data_dir)
  path = versions[-1] / "metadata.json" if versions else None
  if path is None or not path.exists():
    return {}
  try:
    spec = json.loads(path.read_text()).get("dataset_specs", {}).get("v1", {})
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not md_spec.is_hierarchical(spec):
    return {}
  class_names = {str(k): str(w) for k, w in spec.get("class_names", {}).items()}
  name_of = {class_names[str(l)]: f"{md_source}/{l}" for l in labels if str(l) in class_names}
  return md_spec.hierarchy(spec, str(path), name_of)


def _data_source(name: str, split: str, data_dir: str | None):
  """A random-access source, from the registered builder or straight from prepared files."""
  tfds = _tfds()
  try:
    try:
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
      root, versions = _versions(name, data_dir)
      if not versions:
        raise DataError(
            f"tfds:{name}: builder not registered and no prepared files under {root / name}; "
            f"prepare it first (see docs/real-data.md)") from None
      return tfds.builder_from_directory(str(versions[-1])).as_data_source(split=split)
  except (OSError, AssertionError, ValueError, NotImplementedError) as e:
    raise DataError(f"tfds:{name}[{split}]: cannot open ({e}); prepare it with "
                    f"`tfds build {name} --file_format=array_record` (see docs/real-data.md)") from None


@dataclasses.dataclass(frozen=True)
class TfdsReader:
  """Image id → RGB from one or more TFDS splits, opened lazily (picklable)."""

  name: str
  splits: tuple[str, ...]
  data_dir: str | None

  @functools.cached_property
  def sources(self):
    return [_data_source(self.name, s, self.data_dir) for s in self.splits]

  def record(self, image_id: int) -> dict:
    return self.sources[image_id // _ID_STRIDE][image_id % _ID_STRIDE]

  def __call__(self, image_id: int) -> np.ndarray:
    image = np.asarray(self.record(image_id)["image"])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    return to_rgb(Image.fromarray(image))

  def __reduce__(self):
    return TfdsReader, (self.name, self.splits, self.data_dir)


def scan_labels(reader: TfdsReader, cache_dir: Path | None) -> dict[str, np.ndarray]:
  """ids, labels (and alphabet/group labels when present) of every record, cached on disk."""
  cache = None
  if cache_dir is not None:
    cache = cache_dir / f"{reader.name.replace('/', '_')}__{'+'.join(reader.splits)}.npz"
    if cache.exists():
      with np.load(cache) as f:
        return dict(f)
  ids, labels, groups = [], [], []
  for position, source in enumerate(reader.sources):
    for index in range(len(source)):
      record = source[index]
      ids.append(position * _ID_STRIDE + index)
      labels.append(int(record["label"]))
      groups.append(int(record.get("alphabet", -1)))
  scanned = {"ids": np.asarray(ids, np.int64), "labels": np.asarray(labels, np.int64),
             "groups": np.asarray(groups, np.int64)}
  if cache is not None:
    try:
      cache.parent.mkdir(parents=True, exist_ok=True)
      tmp = cache.with_suffix(".tmp.npz")
      np.savez(tmp, **scanned)
      os.replace(tmp, cache)
    except OSError:
      pass  # read-only data dir: scan again next time
  return scanned


def _classes(scanned: dict[str, np.ndarray], labels: Sequence[int], prefix: str) -> list[ImageClass]:
  out = []
  for label in labels:
    rows = scanned["labels"] == label
    group = scanned["groups"][rows]
    out.append(ImageClass(name=f"{prefix}{label}", image_ids=scanned["ids"][rows],
                          group=f"alphabet{group[0]}" if len(group) and group[0] >= 0 else ""))
  return out


def load(spec: str, data_dir: str | None = None, seed: int = 0) -> Domain:
  """`spec` is what follows `tfds:` (see the module docstring)."""
  name, _, split = spec.partition(":")
  cache_dir = Path(data_dir).expanduser() / "smat_index" if data_dir else None
  md_source = name.removeprefix("meta_dataset/")
  if name.startswith("meta_dataset/") or (name in MD_SOURCES and MD_SOURCES[name][0] is None):
    if md_source not in MD_SOURCES:
      raise DataError(f"tfds:{name}: unknown Meta-Dataset source; choose from {sorted(MD_SOURCES)}")
    reader = TfdsReader(f"meta_dataset/{md_source}", ("all_classes",), data_dir)
    scanned = scan_labels(reader, cache_dir)
    labels = sorted(set(scanned["labels"].tolist()))
    classes = _classes(scanned, labels, f"{md_source}/")
    splits = split_classes_by_count(classes, MD_SOURCES[md_source][2])
    hierarchy = md_hierarchy(md_source, data_dir, labels)
  elif name in MD_SOURCES:
    hierarchy = {}  # core TFDS builders carry no Meta-Dataset spec
    builder, tfds_splits, counts = MD_SOURCES[name]
    reader = TfdsReader(builder, tfds_splits, data_dir)
    scanned = scan_labels(reader, cache_dir)
    labels = sorted(set(scanned["labels"].tolist()))
    classes = _classes(scanned, labels, f"{name}/")
    if name == "omniglot":  # Meta-Dataset: evaluation alphabets (TFDS `test`) are the test classes
      test_position = tfds_splits.index("test")
      test_labels = set(scanned["labels"][scanned["ids"] // _ID_STRIDE == test_position].tolist())
      test = [c for c, l in zip(classes, labels) if l in test_labels]
      rest = [c for c, l in zip(classes, labels) if l not in test_labels]
      order = np.random.default_rng(seed).permutation(len(rest))
      n_train = round(len(rest) * counts[0] / (counts[0] + counts[1]))
      rest = [rest[i] for i in order]
      splits = {"train": tuple(rest[:n_train]), "val": tuple(rest[n_train:]), "test": tuple(test)}
    else:
      order = np.random.default_rng(seed).permutation(len(classes))
      permuted = [classes[i] for i in order]
      if len(permuted) != sum(counts):  # e.g. a mock or subset: keep the proportions
        n_train = round(len(permuted) * counts[0] / sum(counts))
        n_val = round(len(permuted) * counts[1] / sum(counts))
        counts = (n_train, n_val, len(permuted) - n_train - n_val)
      splits = split_classes_by_count(permuted, counts)
  else:
    if not split:
      tfds = _tfds()
      try:
        available = set(tfds.builder(name, data_dir=data_dir).info.splits.keys())
      except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tfds:{name}: no such TFDS dataset (see `tfds.list_builders()`)") from None
      split = "test" if "test" in available or not available else "train"
    reader = TfdsReader(name, (split,), data_dir)
    scanned = scan_labels(reader, cache_dir)
    classes = _classes(scanned, sorted(set(scanned["labels"].tolist())), f"{name}/")
    splits, hierarchy = {"train": (), "val": (), "test": tuple(classes)}, {}
  return Domain(name=f"tfds:{spec}", splits=splits, read=reader,
                metadata={"source": "tfds", "builder": reader.name, "tfds_splits": list(reader.splits),
                          "md_source": md_source if md_source in MD_SOURCES else None},
                hierarchy=hierarchy)
