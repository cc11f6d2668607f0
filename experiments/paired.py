"""Paired differences on the same episodes of main-job results (`smat reproduce`'s
results.json): for each domain and shot count, mean ± 95% CI of a per-episode difference.

  python -m experiments.paired OLD/results.json NEW/results.json --out F   # new − old, per method
  python -m experiments.paired R/results.json --between SMAT-Pre,SMAT-PMF --out F   # within one
  python -m experiments.paired R/results.json T_5w1s.json,T_5w5s.json --out F   # a table's columns

Two files must hold the same episodes (same seed, ways, shots, queries and count), e.g. the
main job before and after a change of the method; one file compares its own methods, which
every main job evaluates on identical episodes. `experiments.tables` zero-shot outputs of the
same protocol, one per shot count, joined by commas, read as one result (its columns are the
methods). Writes F.md and F.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks import report


def load(path: str) -> dict:
  """A main-job results.json, or `experiments.tables` zero-shot outputs joined by commas (one
  per shot count, e.g. OUT_5w1s.json,OUT_5w5s.json) in the same layout: {methods: {column:
  {domain: {"5w1s": result}}}, episodes, ways, queries, seed, reserved_episodes}."""
  parts = []
  for part in path.split(","):
    with open(part) as f:
      parts.append(json.load(f))
  if "methods" in parts[0]:
    if len(parts) > 1:
      raise SystemExit(f"error: {path}: join only experiments.tables outputs, not results.json")
    return parts[0]
  protocol = ("episodes", "ways", "queries", "seed")
  first = parts[0]["args"]
  out = {"methods": {}, **{k: first[k] for k in protocol},
         "reserved_episodes": first["lr_search_episodes"]}
  for table in parts:
    a = table["args"]
    if a["modes"] != "zero-shot":
      raise SystemExit(f"error: {path}: a table of --modes {a['modes']}; fine-tuned columns "
                       "report --finetune-episodes, not --episodes: pair zero-shot tables")
    if [a[k] for k in protocol] != [out[k] for k in protocol]:
      raise SystemExit(f"error: {path}: the tables hold different episodes; join tables of "
                       "one protocol that differ only in --shots")
    for column, domains in table["cells"].items():
      for domain, result in domains.items():
        out["methods"].setdefault(column, {}).setdefault(domain, {})[
            f"{a['ways']}w{a['shots']}s"] = result
  return out


def paired(old: list[float], new: list[float]) -> tuple[float, float]:
  """Mean and 95% CI (1.96 · std / √n) of the per-episode difference new − old."""
  d = np.asarray(new, float) - np.asarray(old, float)
  return float(d.mean()), float(1.96 * d.std() / np.sqrt(len(d)))


def differences(old: dict, new: dict) -> dict:
  """{method: {domain: {cell: (mean, ci)}}} over the methods, domains and cells both hold."""
  for field in ("episodes", "ways", "queries", "seed", "reserved_episodes"):
    # Results written before protocols recorded their reserve reported from episode 0.
    was, now = old.get(field, 0), new.get(field, 0)
    if was != now:
      raise SystemExit(f"error: the results differ in {field} ({was} vs {now}): "
                       "they are not the same episodes")
  out = {}
  for method, domains in new["methods"].items():
    if method not in old["methods"]:
      continue
    out[method] = {domain: {cell: paired(old["methods"][method][domain][cell]["per_episode"],
                                         r["per_episode"])
                            for cell, r in cells.items()}
                   for domain, cells in domains.items() if domain in old["methods"][method]}
  return out


def between(results: dict, pairs: list[tuple[str, str]]) -> dict:
  """{"A − B": {domain: {cell: (mean, ci)}}} of method pairs within one result."""
  methods = results["methods"]
  for name in {m for pair in pairs for m in pair} - set(methods):
    raise SystemExit(f"error: no method {name!r} in the results (they hold "
                     f"{', '.join(methods)})")
  return {f"{a} − {b}": {domain: {cell: paired(methods[b][domain][cell]["per_episode"],
                                               r["per_episode"])
                                  for cell, r in cells.items()}
                         for domain, cells in methods[a].items()}
          for a, b in pairs}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("files", nargs="+", metavar="RESULTS.json", help="OLD NEW, or one file")
  parser.add_argument("--between", default=None, metavar="A-B,...",
                      help="with one file: method pairs to difference, e.g. SMAT-Pre,SMAT-PMF")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  if len(args.files) == 2 and not args.between:
    old, new = load(args.files[0]), load(args.files[1])
    diff = {f"{m} new − old": d for m, d in differences(old, new).items()}
    what = "new − old per episode"
  elif len(args.files) == 1 and args.between:
    new = load(args.files[0])
    pairs = [tuple(p.split("-", 1)) for p in args.between.split(",")]
    diff = between(new, pairs)
    what = "per-episode differences between methods"
  else:
    parser.error("give OLD NEW, or one file with --between A-B,...")
  columns = list(diff)
  cells = [(d, c) for d, cs in diff[columns[0]].items() for c in cs]
  lines = [report.provenance("experiments.paired", argv, f"{what}, {new['episodes']} "
                             "episodes per cell, mean ± 95% CI"), "",
           "| domain | episodes | " + " | ".join(columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for domain, cell in cells:
    values = [diff[m][domain][cell] for m in columns]
    lines.append(f"| {domain} | {cell} | " + " | ".join(f"{m:+.2f} ± {c:.2f}" for m, c in values)
                 + " |")
  report.write_results(args.out, {"files": args.files, "differences": diff}, lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
