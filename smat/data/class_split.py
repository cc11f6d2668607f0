"""Your own data for meta-training: a train/val/test class split for a `folder:` or `tfds:`
domain, chosen in its SPEC after a `?`, so that meta-training, validation and evaluation that
name the same SPEC see the same classes (`/` separates numbers: `,` separates SPECs).

  folder:PATH?split=70/15/15          seeded split by shares (any numbers, normalised) ...
  tfds:cifar100?split=64/16/20        ... or by class counts when they add up to the classes
  folder:PATH?split=70/15/15&seed=3   another seed, another assignment (default 0)
  folder:PATH?split=FILE.json         explicit lists: {"train": [...], "val": [...], "test": [...]}
  tfds:cifar100?split=cifar_fs        a packaged list (smat/data/splits/NAME.json, below)
  folder:PATH?groups=dirs             PATH/<group>/<class>/<images>: groups (alphabets, scripts)
                                      for within-group ways; class names are "group/class"
  ...&by=group                        split whole groups, not classes (as Omniglot's alphabets)

Packaged lists: `cifar_fs`, CIFAR-FS's 64/16/20 classes of CIFAR-100 (Bertinetto et al., 2019),
as `tfds:cifar100` names them (`cifar100/<fine label>`, the labels in CIFAR-100's alphabetical
order), from the class lists torchmeta 1.8.0 (MIT) ships for CIFAR-FS.

Without `split` every class is a test class (an evaluation-only domain). The assignment is a
permutation of the sorted names drawn from `seed` alone, so it does not depend on the order
files were found in or on the machine.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from urllib.parse import parse_qsl

import numpy as np

from smat.data.domain import SPLITS, Domain
from smat.errors import DataError

OPTIONS = {"split", "seed", "groups", "by"}
PACKAGED = ("cifar_fs",)  # smat/data/splits/<name>.json


def parse(spec: str) -> tuple[str, dict[str, str]]:
  """'kind:rest?a=1&b=2' → ('kind:rest', {'a': '1', 'b': '2'}); unknown options are an error."""
  base, sep, query = spec.partition("?")
  if not sep:
    return spec, {}
  options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
  unknown = sorted(set(options) - OPTIONS)
  if unknown or not options:
    named = ", ".join(unknown) or repr(query)
    raise DataError(f"{spec}: unknown option(s) {named} after '?'; "
                    f"the options are {', '.join(sorted(OPTIONS))} (e.g. ?split=70/15/15)")
  if options.get("groups", "dirs") != "dirs":
    raise DataError(f"{spec}: groups={options['groups']}; the one grouping is groups=dirs "
                    f"(PATH/<group>/<class>/<images>)")
  if options.get("by", "class") not in ("class", "group"):
    raise DataError(f"{spec}: by={options['by']}; use by=class or by=group")
  if "split" not in options and ({"seed", "by"} & set(options)):
    raise DataError(f"{spec}: seed and by choose how `split` assigns classes; add "
                    f"split=TRAIN/VAL/TEST or split=FILE.json")
  return base, options


def apply(domain: Domain, options: dict[str, str], spec: str) -> Domain:
  """`domain` with its classes (from every split it has) reassigned as `options` say."""
  if "split" not in options:
    return domain
  classes = sorted((c for s in SPLITS for c in domain.classes(s)), key=lambda c: c.name)
  by_group = options.get("by") == "group"
  if by_group and not all(c.group for c in classes):
    raise DataError(f"{spec}: by=group needs a group for every class (folder: add "
                    f"groups=dirs)")
  units = sorted({c.group for c in classes}) if by_group else [c.name for c in classes]
  value = options["split"]
  if value in PACKAGED:
    value = str(importlib.resources.files("smat.data") / "splits" / f"{value}.json")
  if value.endswith(".json"):
    assignment = _from_file(value, units, spec, "groups" if by_group else "classes")
  else:
    assignment = _seeded(value, units, _seed(options, spec), spec)
  key = (lambda c: c.group) if by_group else (lambda c: c.name)
  splits = {s: tuple(c for c in classes if assignment[key(c)] == s) for s in SPLITS}
  return dataclasses.replace(domain, name=spec, splits=splits,
                             metadata={**domain.metadata, "class_split": {
                                 "rule": value, "seed": options.get("seed", "0"),
                                 "by": "group" if by_group else "class",
                                 **{s: len(splits[s]) for s in SPLITS}}})


def _seed(options, spec) -> int:
  text = options.get("seed", "0")
  if not text.isdigit():
    raise DataError(f"{spec}: seed={text}; give a non-negative integer")
  return int(text)


def _seeded(value: str, units: list[str], seed: int, spec: str) -> dict[str, str]:
  """Shares or counts → a seeded permutation of `units` cut into train/val/test blocks."""
  try:
    parts = [float(x) for x in value.split("/")]
  except ValueError:
    parts = []
  if len(parts) != 3 or min(parts, default=-1) < 0 or not sum(parts) > 0:
    raise DataError(f"{spec}: split={value}; give three non-negative numbers TRAIN/VAL/TEST "
                    f"(shares such as 70,15,15, or class counts), or a FILE.json")
  n = len(units)
  if sum(parts) == n and all(p == int(p) for p in parts):
    counts = [int(p) for p in parts]
  else:
    train, val = (round(n * p / sum(parts)) for p in parts[:2])
    counts = [train, val, n - train - val]
  if counts[0] < 1 or min(counts) < 0:
    raise DataError(f"{spec}: split={value} leaves {counts[0]} of {n} to train; give train a "
                    f"larger share")
  order = np.random.default_rng(seed).permutation(n)
  names = [units[i] for i in order]
  a, b = counts[0], counts[0] + counts[1]
  return {**{u: "train" for u in names[:a]}, **{u: "val" for u in names[a:b]},
          **{u: "test" for u in names[b:]}}


def _from_file(path: str, units: list[str], spec: str, what: str) -> dict[str, str]:
  """{"train": [...], "val": [...], "test": [...]} naming every class (or group) once."""
  try:
    with open(os.path.expanduser(path), encoding="utf-8") as f:
      lists = json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read the split file ({e.strerror or e})") from None
  except ValueError as e:
    raise DataError(f"{path}: not JSON ({e})") from None
  if not isinstance(lists, dict) or set(lists) - set(SPLITS) or not all(
      isinstance(v, list) for v in lists.values()):
    raise DataError(f"{path}: expected {{\"train\": [names], \"val\": [...], \"test\": [...]}}")
  assignment, twice = {}, []
  for split, names in lists.items():
    for name in map(str, names):
      if name in assignment:
        twice.append(name)
      assignment[name] = split
  known = set(units)
  unknown = sorted(set(assignment) - known)
  missing = sorted(known - set(assignment))
  problems = [f"{label} ({len(names)}): {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
              for label, names in (("not in the data", unknown), ("in no split", missing),
                                   ("in two splits", sorted(set(twice)))) if names]
  if problems:
    raise DataError(f"{path}: the split file must name each of the {len(units)} {what} of "
                    f"{spec.partition('?')[0]} once; " + "; ".join(problems))
  return assignment
