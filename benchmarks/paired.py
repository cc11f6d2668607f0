"""Paired differences between two main-job results (`smat reproduce`'s results.json) on the same
episodes: for each method, domain and shot count, mean ± 95% CI of (new − old) per episode.

  python -m benchmarks.paired OLD/results.json NEW/results.json --out F

The two files must hold the same episodes (same seed, ways, shots, queries and count), e.g. the
main job before and after a change of the method. Writes F.md and F.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks import report


def paired(old: list[float], new: list[float]) -> tuple[float, float]:
  """Mean and 95% CI (1.96 · std / √n) of the per-episode difference new − old."""
  d = np.asarray(new, float) - np.asarray(old, float)
  return float(d.mean()), float(1.96 * d.std() / np.sqrt(len(d)))


def differences(old: dict, new: dict) -> dict:
  """{method: {domain: {cell: (mean, ci)}}} over the methods, domains and cells both hold."""
  for field in ("episodes", "ways", "queries", "seed"):
    if old[field] != new[field]:
      raise SystemExit(f"error: the results differ in {field} ({old[field]} vs {new[field]}): "
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("old")
  parser.add_argument("new")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  with open(args.old) as f, open(args.new) as g:
    old, new = json.load(f), json.load(g)
  diff = differences(old, new)
  methods = list(diff)
  cells = [(d, c) for d, cs in diff[methods[0]].items() for c in cs]
  lines = [report.provenance("paired", argv, f"new − old per episode, {new['episodes']} "
                             "episodes per cell, mean ± 95% CI"), "",
           "| domain | episodes | " + " | ".join(f"{m} new − old" for m in methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for domain, cell in cells:
    values = [diff[m][domain][cell] for m in methods]
    lines.append(f"| {domain} | {cell} | " + " | ".join(f"{m:+.2f} ± {c:.2f}" for m, c in values)
                 + " |")
  with open(args.out + ".json", "w") as f:
    json.dump({"old": args.old, "new": args.new, "differences": diff}, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
