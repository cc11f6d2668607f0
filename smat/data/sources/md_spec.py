"""Meta-Dataset's hierarchical dataset spec (ImageNet): classes per split and the class DAG.

Meta-Dataset writes ImageNet's spec as JSON with
* `split_subgraphs`: {"TRAIN" | "VALID" | "TEST": [{"wn_id", "words", "children_ids",
  "parents_ids"}, ...]}, one WordNet subgraph per split whose childless nodes are that split's
  classes;
* `images_per_class`: {split: {wn_id: images}};
* `class_names`: {"<class id>": wn_id}, ids contiguous train → valid → test.
P>M>F's .h5 conversion keeps this `dataset_spec.json` beside the class files; the
`meta_dataset/ilsvrc_2012` TFDS builder keeps it in its `metadata.json` under
`dataset_specs` → `v1`.
"""

from __future__ import annotations

from collections.abc import Mapping

from smat.errors import DataError

SPLITS = {"TRAIN": "train", "VALID": "val", "TEST": "test"}


def is_hierarchical(spec: Mapping) -> bool:
  return "split_subgraphs" in spec


def _subgraph(spec: Mapping, split: str, where: str) -> list[dict]:
  try:
    return list(spec["split_subgraphs"][split])
  except (KeyError, TypeError):
    raise DataError(f"{where}: split_subgraphs needs keys {tuple(SPLITS)}") from None


def split_classes(spec: Mapping, where: str) -> dict[str, list[str]]:
  """{train | val | test: wn_ids of the split's classes (its subgraph's leaves), by class id}."""
  class_id = {str(wn_id): int(k) for k, wn_id in spec.get("class_names", {}).items()}
  out = {}
  for key, split in SPLITS.items():
    leaves = [str(n["wn_id"]) for n in _subgraph(spec, key, where) if not n.get("children_ids")]
    missing = [w for w in leaves if w not in class_id]
    if missing:
      raise DataError(f"{where}: class_names has no id for {split} class {missing[0]!r}")
    out[split] = sorted(leaves, key=class_id.__getitem__)
  return out


def images_per_class(spec: Mapping) -> dict[str, int]:
  """{wn_id: images} of every class."""
  counts = {}
  for key in SPLITS:
    counts.update({str(w): int(n) for w, n in spec.get("images_per_class", {}).get(key, {}).items()})
  return counts


def hierarchy(spec: Mapping, where: str,
              name_of: Mapping[str, str] | None = None) -> dict[str, tuple[str, ...]]:
  """The split subgraphs as one DAG for `Domain.hierarchy`.

  A synset has different children in each split's subgraph, so internal nodes are named
  `<SPLIT>:<wn_id>`; the leaves are class names, `name_of[wn_id]` (default: the wn_id). A
  split's classes then sit under its own subgraph's nodes only, as in Meta-Dataset.
  """
  dag = {}
  for key in SPLITS:
    nodes = _subgraph(spec, key, where)
    internal = {str(n["wn_id"]) for n in nodes if n.get("children_ids")}
    node = lambda w: f"{key}:{w}" if w in internal else (name_of or {}).get(w, w)
    for n in nodes:
      if n.get("children_ids"):
        dag[node(str(n["wn_id"]))] = tuple(node(str(c)) for c in n["children_ids"])
  return dag
