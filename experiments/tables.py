"""The offline-benchmark table in the paper's layout: rows = domains, columns = Pre, PMF,
SoftMerge and SMAT, each zero-shot and +full and +LoRA fine-tuned, with ID/OOD averages.

  python -m experiments.tables --backbone runs/pretrain/backbone --runs pmf=runs/bench/pmf,\
softmerge=runs/bench/softmerge,smat=runs/bench/smat --out experiments/results/table_glyphs

Rows default to the glyphs ID scripts (their test classes) one by one, the held-out scripts one
by one and Fashion-MNIST; `--rows pooled` uses glyphs:id, glyphs:ood and fashion_mnist instead;
`--rows run` the first run's benchmark (its config's data.test, e.g. Meta-Dataset's 10 test
sources, with `--sampler md` for the paper's variable-way variable-shot episodes).
Every cell is `smat.evaluate.evaluate` on the same episodes (same seed; the first
`--lr-search-episodes` of each domain pick the fine-tuning lr and are never reported). Cells are
saved to OUT.json as they finish, so an interrupted run resumes where it stopped; OUT.md holds
the table with the command, machine, date, commit and wall time in its header.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import report
from smat import evaluate, fewshot, finetune, metatrain
from smat.data import spec as spec_lib
from smat.data.samplers import FixedSampler, MetaDatasetSampler
from smat.data.sources import glyphs
from smat.models import checkpoint

METHODS = ("pre", "pmf", "softmerge", "smat")
# --modes may add "sparse" (SMAT only) and the sparsity strategies (stand-alone sparse
# fine-tuning at density 0.1).
MODES = ("zero-shot", "full", "lora")
STRATEGY_MODES = ("random", "map", "influence", "selfpruner", "circuit")
LABELS = evaluate.METHOD_LABELS
MODE_LABELS = {"zero-shot": "", "full": " +full", "lora": " +LoRA", "sparse": " +sparse",
               # stand-alone sparse fine-tuning by a sparsity strategy (smat.finetune.ADAPTERS)
               "random": " +random", "map": " +MAP", "influence": " +influence",
               "selfpruner": " +Self-Pruner", "circuit": " +circuit"}


def row_specs(rows: str, data_dir: str | None, workdir: str | None = None
              ) -> tuple[list[str], list[str]]:
  """(ID specs, OOD specs) of the table's rows; `run`: the run's benchmark, its config's
  data.test, ID where the run meta-trained on the source (as `smat evaluate` splits them)."""
  if rows == "run":
    from smat import config as config_lib

    config = config_lib.from_json(os.path.join(workdir, "config.json"))
    test = [s for s in config.data.test.split(",") if s]
    trained = set(config.data.train.split(","))
    return [s for s in test if s in trained], [s for s in test if s not in trained]
  if rows == "pooled":
    return ["glyphs:id"], ["glyphs:ood", "fashion_mnist"]
  meta = json.loads((glyphs.find_build(data_dir or spec_lib.default_data_dir())
                     / "metadata.json").read_text())
  name = lambda script: "glyphs:" + script.lower().replace(" ", "_")
  return ([name(s) for s in meta["id_scripts"]],
          [name(s) for s in meta["ood_scripts"]] + ["fashion_mnist"])


def cell_name(method: str, mode: str) -> str:
  return LABELS[method] + MODE_LABELS[mode]


def markdown(cells: dict, id_specs, ood_specs, columns) -> str:
  """Rows = domains then ID/OOD averages (mean accuracy and mean CI); columns = cells."""
  present = [c for c in columns if c in cells]
  lines = ["| domain | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
  for spec in id_specs + ood_specs:
    tag = "ID" if spec in id_specs else "OOD"
    values = [cells[c].get(spec) for c in present]
    lines.append(f"| {spec} ({tag}) | " + " | ".join(
        "—" if v is None else f"{v['accuracy']:.2f} ± {v['ci95']:.2f}" for v in values) + " |")
  for kind, specs in (("ID", id_specs), ("OOD", ood_specs)):
    row = []
    for c in present:
      done = [cells[c][s] for s in specs if s in cells[c]]
      row.append("—" if len(done) < len(specs) else
                 f"**{np.mean([d['accuracy'] for d in done]):.2f}** ± "
                 f"{np.mean([d['ci95'] for d in done]):.2f}")
    lines.append(f"| **{kind} average** | " + " | ".join(row) + " |")
  return "\n".join(lines)


def paired(cells: dict, a: str, b: str, specs) -> dict[str, tuple[float, float]]:
  """{spec: (mean of a − b, 95% CI)} over the identical episodes both cells ran (the common
  prefix: a zero-shot cell with more episodes is cut to a fine-tuned one's), for the specs where
  both kept per-episode accuracies; "average" = the mean difference over those specs (CI of a
  mean of independent domains)."""
  out = {}
  for spec in specs:
    x, y = cells.get(a, {}).get(spec), cells.get(b, {}).get(spec)
    if x and y and "per_episode" in x and "per_episode" in y:
      n = min(len(x["per_episode"]), len(y["per_episode"]))  # both start at the same episode
      out[spec] = fewshot.mean_ci(np.subtract(x["per_episode"][:n], y["per_episode"][:n]))
  if out and len(out) == len(specs):
    out["average"] = (float(np.mean([d for d, _ in out.values()])),
                      float(np.sqrt(np.sum([c ** 2 for _, c in out.values()]))) / len(specs))
  return out


def paired_markdown(cells: dict, id_specs, ood_specs, pairs) -> str:
  """Rows = domains and ID/OOD averages; columns = "A − B" differences with paired 95% CIs."""
  pairs = [(a, b) for a, b in pairs if a in cells and b in cells]
  lines = ["| domain | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
           "|---|" + "---|" * len(pairs)]
  rows = {kind: {(a, b): paired(cells, a, b, specs) for a, b in pairs}
          for kind, specs in (("ID", id_specs), ("OOD", ood_specs))}
  fmt = lambda d: "—" if d is None else f"{d[0]:+.2f} ± {d[1]:.2f}"
  for kind, specs in (("ID", id_specs), ("OOD", ood_specs)):
    for spec in specs:
      lines.append(f"| {spec} ({kind}) | "
                   + " | ".join(fmt(rows[kind][p].get(spec)) for p in pairs) + " |")
  for kind in ("ID", "OOD"):
    lines.append(f"| **{kind} average** | "
                 + " | ".join(fmt(rows[kind][p].get("average")) for p in pairs) + " |")
  return "\n".join(lines)


def comparison_pairs(columns) -> list[tuple[str, str]]:
  """SMAT against PMF and SoftMerge in each mode present, and SMAT fine-tuned (full, LoRA,
  sparse) against zero-shot SMAT."""
  pairs = []
  for mode in MODE_LABELS.values():
    for other in ("PMF", "SoftMerge"):
      if f"SMAT{mode}" in columns and f"{other}{mode}" in columns:
        pairs.append((f"SMAT{mode}", f"{other}{mode}"))
  return pairs + [(f"SMAT{MODE_LABELS[m]}", "SMAT") for m in ("full", "lora", "sparse")
                  if f"SMAT{MODE_LABELS[m]}" in columns and "SMAT" in columns]


def strategy_pairs(columns) -> list[tuple[str, str]]:
  """For each method: every sparse fine-tuning (SMAT's learned mask, then each strategy)
  against its full fine-tuning, and SMAT's learned mask against each strategy."""
  sparse = ("sparse",) + STRATEGY_MODES
  pairs = [(f"{label}{MODE_LABELS[m]}", f"{label} +full") for label in LABELS.values()
           for m in sparse if f"{label}{MODE_LABELS[m]}" in columns
           and f"{label} +full" in columns]
  return pairs + [("SMAT +sparse", f"SMAT{MODE_LABELS[m]}") for m in STRATEGY_MODES
                  if "SMAT +sparse" in columns and f"SMAT{MODE_LABELS[m]}" in columns]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--backbone", help="θ_pre (the Pre columns)")
  parser.add_argument("--runs", required=True, metavar="METHOD=WORKDIR,...",
                      help="meta-train workdirs of pmf, softmerge and smat")
  parser.add_argument("--rows", choices=["scripts", "pooled", "run"], default="scripts",
                      help="scripts, pooled: the glyph benchmark's rows; run: the test sources "
                           "of the first run's benchmark (its config's data.test; Meta-Dataset's "
                           "10 for the *_md configs)")
  parser.add_argument("--sampler", choices=["fixed", "md"], default="fixed",
                      help="fixed --ways/--shots/--queries episodes, or Meta-Dataset's "
                           "variable-way variable-shot ones (the paper's Meta-Dataset tables)")
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="columns to evaluate, of " + ",".join(METHODS))
  parser.add_argument("--episodes", type=int, default=600, help="zero-shot episodes per cell")
  parser.add_argument("--finetune-episodes", type=int, default=600,
                      help="fine-tuned episodes per cell")
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=5)
  parser.add_argument("--queries", type=int, default=15)
  parser.add_argument("--finetune-steps", type=int, default=50)
  parser.add_argument("--lrs", default=",".join(f"{x:g}" for x in finetune.LEARNING_RATES))
  parser.add_argument("--lr-search-episodes", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
  args = parser.parse_args(argv)

  start = time.time()
  runs = dict(item.split("=", 1) for item in args.runs.split(","))
  modes = args.modes.split(",")
  id_specs, ood_specs = row_specs(args.rows, args.data_dir, next(iter(runs.values()), None))
  ft = finetune.FinetuneConfig(steps=args.finetune_steps,
                               lrs=tuple(float(x) for x in args.lrs.split(",")),
                               search_episodes=args.lr_search_episodes)
  sampler = (MetaDatasetSampler() if args.sampler == "md"
             else FixedSampler(args.ways, args.shots, args.queries))
  groups = {s: spec_lib.load_domains(s, args.data_dir, seed=args.seed)
            for s in id_specs + ood_specs}
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {}
  cells, elapsed = saved.get("cells", {}), saved.get("seconds", 0.0)
  unknown = set(args.methods.split(",")) - set(METHODS)
  if unknown:
    parser.error(f"--methods: unknown {sorted(unknown)}; choose from {','.join(METHODS)}")
  methods = [m for m in METHODS if m in args.methods.split(",")]
  columns = [cell_name(m, mode) for m in methods for mode in modes
             if mode != "sparse" or m == "smat"]

  def write():
    tuned = [m for m in modes if m != "zero-shot"]
    episodes = ("Meta-Dataset variable-way variable-shot" if args.sampler == "md" else
                f"{args.ways}-way {args.shots}-shot {args.queries}-query")
    protocol = (f"{episodes}; zero-shot "
                f"{args.episodes} episodes per cell"
                + (f", fine-tuned ({', '.join(tuned)}) {args.finetune_episodes}; {ft.steps} "
                   f"steps, lr grid {list(ft.lrs)} searched per domain" if tuned else "")
                + f"; the first {ft.search_episodes} episodes of every domain reserved (not "
                f"reported); seed {args.seed}")
    header = report.provenance(
        "experiments.tables", argv, f"wall time {(elapsed + time.time() - start) / 60:.1f} "
        "min (all invocations)", protocol) + "\n"
    with open(path, "w") as f:
      json.dump(report.stamped({"args": vars(args), "finetune": ft.__dict__, "id": id_specs,
                                "ood": ood_specs, "cells": cells,
                                "seconds": elapsed + time.time() - start,
                                "software": evaluate.software_versions()}), f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(header + "\n" + markdown(cells, id_specs, ood_specs, columns) + "\n")
      for title, pairs in (("", comparison_pairs(columns)),
                           (" of sparse fine-tuning", strategy_pairs(columns))):
        if any(a in cells and b in cells for a, b in pairs):
          f.write(f"\nPaired differences{title} on the identical episodes (mean ± 95% CI of "
                  "the per-episode difference):\n\n"
                  + paired_markdown(cells, id_specs, ood_specs, pairs) + "\n")

  if "pre" in methods and not args.backbone:
    parser.error("--backbone is needed for the Pre columns (or leave pre out of --methods)")
  models = {"pre": (checkpoint.load(args.backbone), None)} if "pre" in methods else {}
  for method in methods:
    if method != "pre" and method in runs:
      models[method] = (metatrain.load_run(runs[method]), runs[method])
  for mode in modes:
    for method, (model, workdir) in models.items():
      if mode == "sparse" and method != "smat":
        continue  # only SMAT has a merged mask to restrict the update to
      name = cell_name(method, mode)
      cells.setdefault(name, {})
      size = model[1].image_size if workdir is None else run_image_size(workdir)
      episodes = args.episodes if mode == "zero-shot" else args.finetune_episodes
      for spec, group in groups.items():
        if spec in cells[name]:
          continue
        protocol = evaluate.Protocol(sampler, size, episodes, args.seed,
                                     reserved=ft.search_episodes)
        result = evaluate.evaluate(model, {spec: group}, protocol, mode, ft, progress=True)
        cells[name][spec] = result[spec]
        print(f"{name:>18} {spec:<22} {result[spec]['accuracy']:6.2f} ± "
              f"{result[spec]['ci95']:.2f}", flush=True)
        write()
  write()
  print(markdown(cells, id_specs, ood_specs, columns))
  return 0


def run_image_size(workdir: str) -> int:
  from smat import config as config_lib

  return config_lib.from_json(os.path.join(workdir, "config.json")).data.image_size


if __name__ == "__main__":
  sys.exit(main())
