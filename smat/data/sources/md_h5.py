"""Meta-Dataset as converted to HDF5 by P>M>F (the files the PyTorch SMAT and P>M>F code read).

Layout of `<root>/<source>/`:
* `dataset_spec.json` — Meta-Dataset's spec: `classes_per_split` ({"TRAIN": a, "VALID": b,
  "TEST": c}; class ids are contiguous in that order), `images_per_class` ({"<id>": n}),
  optional `class_names`. Omniglot's bi-level spec gives `superclasses_per_split` and
  `classes_per_superclass` instead (superclass = alphabet, used to draw ways within one alphabet).
  ImageNet's hierarchical spec gives `split_subgraphs` (see `md_spec`): the classes are each
  split's WordNet leaves and the DAG is the domain's class hierarchy (episodes under one node).
* `hierarchy.json` (optional, any source) — a class hierarchy {"<node>": ["<child>", ...]}
  whose leaves are class names (`class_names`, e.g. WordNet ids); used in place of the spec's.
* `<class_id>.h5` — one file per class; group `"<j>"` per image holding `image`
  (uint8 [H, W, 3] RGB) and `label`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from smat.data.domain import Domain, ImageClass
from smat.data.sources import md_spec
from smat.data.sources.tfds_source import MD_SOURCES
from smat.errors import DataError, require

_ID_STRIDE = 1 << 32  # image id = class id · stride + image index
_SPLIT_KEYS = ("TRAIN", "VALID", "TEST")


def _per_split(mapping: dict, field: str, path: Path) -> tuple[int, int, int]:
  normalised = {str(k).split(".")[-1].upper(): int(v) for k, v in mapping.items()}
  try:
    return tuple(normalised[k] for k in _SPLIT_KEYS)
  except KeyError:
    raise DataError(f"{path}: field {field!r} needs keys {_SPLIT_KEYS}, got {sorted(mapping)}") from None


def _class_layout(spec: dict, source: str, path: Path) -> tuple[tuple[int, int, int], list[str]]:
  """(classes per split, superclass name per class id) from any Meta-Dataset spec flavour."""
  if "classes_per_split" in spec:
    counts = _per_split(spec["classes_per_split"], "classes_per_split", path)
    return counts, [""] * sum(counts)
  if "superclasses_per_split" in spec and "classes_per_superclass" in spec:
    supers = _per_split(spec["superclasses_per_split"], "superclasses_per_split", path)
    per_super = {int(k): int(v) for k, v in spec["classes_per_superclass"].items()}
    names = spec.get("superclass_names", {})
    groups, counts, superclass = [], [], 0
    for n_super in supers:
      n_classes = 0
      for _ in range(n_super):
        groups += [names.get(str(superclass), f"superclass{superclass}")] * per_super[superclass]
        n_classes += per_super[superclass]
        superclass += 1
      counts.append(n_classes)
    return tuple(counts), groups
  if source in MD_SOURCES:  # a spec without counts: Meta-Dataset's fixed counts
    counts = MD_SOURCES[source][2]
    return counts, [""] * sum(counts)
  raise DataError(f"{path}: no `classes_per_split` (or bi-level superclass fields) in the spec")


@dataclasses.dataclass(frozen=True)
class H5Reader:
  """Image id → RGB from `<dir>/<class_id>.h5`; files opened per read (safe across threads)."""

  directory: str

  def __call__(self, image_id: int) -> np.ndarray:
    import h5py

    class_id, index = divmod(int(image_id), _ID_STRIDE)
    path = Path(self.directory) / f"{class_id}.h5"
    try:
      with h5py.File(path, "r") as f:
        image = np.asarray(f[str(index)]["image"][()])
    except (OSError, KeyError) as e:
      raise DataError(f"{path}: cannot read image {index} ({e})") from None
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    return image.astype(np.uint8)


def _hierarchical_layout(spec: dict, path: Path):
  """(classes per split, images per class id, class names, DAG) of a hierarchical spec."""
  leaves = md_spec.split_classes(spec, str(path))
  sizes = md_spec.images_per_class(spec)
  ordered = [w for split in ("train", "val", "test") for w in leaves[split]]
  missing = [w for w in ordered if w not in sizes]
  if missing:
    raise DataError(f"{path}: images_per_class has no entry for class {missing[0]!r}")
  counts = tuple(len(leaves[split]) for split in ("train", "val", "test"))
  names = {str(i): w for i, w in enumerate(ordered)}
  if {str(k): str(w) for k, w in spec["class_names"].items()} != names:
    raise DataError(f"{path}: class ids of class_names are not contiguous train → valid → test "
                    f"in the order of split_subgraphs' leaves")
  dag = md_spec.hierarchy(spec, str(path))
  return counts, {i: sizes[w] for i, w in enumerate(ordered)}, names, dag


def _hierarchy_file(directory: Path) -> dict[str, tuple[str, ...]] | None:
  path = directory / "hierarchy.json"
  if not path.exists():
    return None
  try:
    dag = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(dag, dict) or not all(isinstance(v, list) for v in dag.values()):
    raise DataError(f"{path}: expected {{\"<node>\": [\"<child>\", ...]}}")
  return {str(k): tuple(str(c) for c in v) for k, v in dag.items()}


def load(root: str, source: str) -> Domain:
  require("h5py", "h5", f"md_h5:{root}:{source}")  # before the reader threads need it
  directory = Path(root) / source
  spec_path = directory / "dataset_spec.json"
  if not spec_path.exists():
    raise DataError(f"md_h5:{root}:{source}: {spec_path} not found (expected P>M>F's converted "
                    f"Meta-Dataset: <root>/<source>/dataset_spec.json and <class_id>.h5 files)")
  try:
    spec = json.loads(spec_path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{spec_path}: not valid JSON ({e})") from None
  if "images_per_class" not in spec:
    raise DataError(f"{spec_path}: missing field 'images_per_class'")
  if md_spec.is_hierarchical(spec):
    counts, images_per_class, names, hierarchy = _hierarchical_layout(spec, spec_path)
    groups = [""] * sum(counts)
  else:
    counts, groups = _class_layout(spec, source, spec_path)
    images_per_class = {int(k): int(v) for k, v in spec["images_per_class"].items()}
    names, hierarchy = spec.get("class_names", {}), {}
  hierarchy = _hierarchy_file(directory) or hierarchy
  classes = []
  for class_id in range(sum(counts)):
    if class_id not in images_per_class:
      raise DataError(f"{spec_path}: images_per_class has no entry for class {class_id}")
    if not (directory / f"{class_id}.h5").exists():
      raise DataError(f"{directory / f'{class_id}.h5'}: missing class file listed in {spec_path.name}")
    ids = class_id * _ID_STRIDE + np.arange(images_per_class[class_id], dtype=np.int64)
    classes.append(ImageClass(name=str(names.get(str(class_id), f"{source}/{class_id}")),
                              image_ids=ids, group=groups[class_id]))
  a, b = counts[0], counts[0] + counts[1]
  return Domain(name=f"md_h5:{root}:{source}",
                splits={"train": tuple(classes[:a]), "val": tuple(classes[a:b]),
                        "test": tuple(classes[b:])},
                read=H5Reader(str(directory)),
                metadata={"source": "md_h5", "path": str(directory), "md_source": source},
                hierarchy=hierarchy)
