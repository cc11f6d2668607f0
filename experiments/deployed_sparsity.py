"""Per-expert sparsity of trained SMAT runs: deployed (deterministic meta-test masks, what τ
constrains) against sampled (one draw of the training gates) and expected (1 − E[L0]), for the
final checkpoint and for the best-validating one (the one meta-test evaluates).

  python -m experiments.deployed_sparsity runs/accept_ref/tau0.9_m4 runs/accept_full/tau0.9_m4 \
      --out experiments/results/deployed_sparsity_glyphs

Writes OUT.json and OUT.md (command, machine, date and commit in the header).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


from benchmarks import report
from smat import metatrain


def describe(workdir: str) -> dict:
  """τ, gate noise, and for `checkpoints` (final) and `best`: step, validation accuracy and
  the per-expert sparsity figures."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  out = {"workdir": workdir, "tau": config["experts"]["target_sparsity"],
         "gate_noise": config["experts"]["gate_noise"]}
  for which in ("checkpoints", "best"):
    described = metatrain.describe_checkpoint(workdir, metatrain.load_run(workdir, which), which)
    out[which] = {"step": described["step"], "val_accuracy": described["val_accuracy"],
                  **described["sparsity"]}
  return out


def _row(d: dict, which: str) -> str:
  c = d[which]
  fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)
  worst = max(abs(x - d["tau"]) for x in c["deployed"])
  return (f"| {d['tau']:g} | {d['gate_noise']:g} | {which} (step {c['step']}, val "
          f"{c['val_accuracy']:.2f}) | {fmt(c['deployed'])} | {worst:.3f} | {fmt(c['sampled'])} | "
          f"{fmt(c['expected'])} |")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  runs = [describe(w) for w in args.workdirs]
  lines = [report.provenance("experiments.deployed_sparsity", argv,
                             "per expert; |deployed − τ| is the largest over experts"), "",
           "| τ | gate noise w | checkpoint | deployed | max \\|deployed − τ\\| | sampled | "
           "expected (1 − E[L0]) |", "|---|---|---|---|---|---|---|"]
  lines += [_row(d, which) for d in runs for which in ("checkpoints", "best")]
  report.write_results(args.out, {"runs": runs}, lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
