"""Meta-Dataset in P>M>F's .h5 layout at toy size, for the source tests and the end-to-end run of
the real protocol: `<root>/<source>/dataset_spec.json` and one `<class_id>.h5` per class."""

import json
from pathlib import Path

import numpy as np


def pixels(class_id, index):
  """Deterministic image for (class, index); sizes differ between classes."""
  rng = np.random.default_rng([class_id, index])
  return rng.integers(0, 256, size=(6 + class_id, 9, 3), dtype=np.uint8)


def write_md_h5(root, source, images_per_class, layout, image=pixels):
  """One source: its spec (`layout` holds the split fields) and its class files."""
  import h5py

  directory = Path(root) / source
  directory.mkdir(parents=True)
  spec = {"name": source, "images_per_class": {str(k): n for k, n in enumerate(images_per_class)},
          "class_names": {str(k): f"n{k:08d}" for k in range(len(images_per_class))},
          "path": str(directory), "file_pattern": "{}.tfrecords", **layout}
  (directory / "dataset_spec.json").write_text(json.dumps(spec))
  for class_id, n in enumerate(images_per_class):
    with h5py.File(directory / f"{class_id}.h5", "w") as f:
      for j in range(n):
        group = f.create_group(str(j))
        group.create_dataset("image", data=image(class_id, j))
        group.create_dataset("label", data=np.array([class_id], np.int32))
        group.create_dataset("id", data=class_id * 1000 + j)
  return directory


def hierarchical_spec(images, train, val, test, train_nodes):
  """Meta-Dataset's ImageNet-style spec for classes n0.. in id order: `train`, `val`, `test`
  classes per split; TRAIN's root `r` has the children `train_nodes` (name → class ids), VALID's
  and TEST's roots have their classes as leaves directly."""
  wn = lambda i: f"n{i:08d}"
  node = lambda w, children: {"wn_id": w, "words": w, "children_ids": children, "parents_ids": []}
  leaf = lambda i: node(wn(i), [])
  per_split = {"TRAIN": range(train), "VALID": range(train, train + val),
               "TEST": range(train + val, train + val + test)}
  subgraphs = {
      "TRAIN": [node("r", list(train_nodes))]
               + [node(k, [wn(i) for i in ids]) for k, ids in train_nodes.items()]
               + [leaf(i) for i in per_split["TRAIN"]],
      "VALID": [node("r", [wn(i) for i in per_split["VALID"]])]
               + [leaf(i) for i in per_split["VALID"]],
      "TEST": [node("r", [wn(i) for i in per_split["TEST"]])] + [leaf(i) for i in per_split["TEST"]],
  }
  return {"__class__": "HierarchicalDatasetSpecification", "split_subgraphs": subgraphs,
          "images_per_class": {k: {wn(i): images[i] for i in ids} for k, ids in per_split.items()}}


def write_meta_dataset(root, images_per_class=6, classes=5):
  """All ten sources of Meta-Dataset's protocol, each split with `classes` classes (ImageNet's
  TRAIN split with one more, under two overlapping nodes; Omniglot's in alphabets; traffic_sign
  test-only, mscoco val/test-only, as in Meta-Dataset), images of 12–17 px in a few colours."""
  k, n = classes, images_per_class

  def image(class_id, index):
    rng = np.random.default_rng([class_id, index])
    size = 12 + (class_id + index) % 6
    tone = rng.integers(0, 256, size=3)
    return np.clip(tone + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)

  flat = {"classes_per_split": {"TRAIN": k, "VALID": k, "TEST": k}}
  for source in ("aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower"):
    write_md_h5(root, source, [n] * 3 * k, flat, image)
  write_md_h5(root, "ilsvrc_2012", [n] * (3 * k + 1),
              hierarchical_spec([n] * (3 * k + 1), k + 1, k, k,
                                {"a": range(k), "b": range(1, k + 1)}), image)
  write_md_h5(root, "omniglot", [n] * 4 * k,
              {"superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
               "classes_per_superclass": {str(s): k for s in range(4)},
               "superclass_names": {"0": "Latin", "1": "Greek", "2": "Korean", "3": "Tibetan"}},
              image)
  write_md_h5(root, "traffic_sign", [n] * k,
              {"classes_per_split": {"TRAIN": 0, "VALID": 0, "TEST": k}}, image)
  write_md_h5(root, "mscoco", [n] * 2 * k,
              {"classes_per_split": {"TRAIN": 0, "VALID": k, "TEST": k}}, image)
  return Path(root)
