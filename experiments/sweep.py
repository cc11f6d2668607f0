"""Sparsity sweep: meta-train SMAT for each (τ, M), evaluate zero-shot ID and OOD, plot the
trade-off (the paper's ID-vs-OOD figure).

  python -m experiments.sweep --config smat_glyphs --taus 0,0.5,0.8,0.9,0.95,0.99 \
      --experts 4,8,16 --workdir runs/sweep --out experiments/results/sweep_glyphs

Each point is `smat meta-train` with experts.target_sparsity = τ and experts.num_experts = M
(every other field from the config), then `smat.evaluate.evaluate` zero-shot on the ID and OOD specs
on the same episodes for every point. Finished runs and points are reused, so an interrupted
sweep resumes. `--checkpoint` picks the evaluated checkpoint (the best-validating one by
default, or the final one); the step and sparsity columns are those of the evaluated checkpoint: `deployed` of its
deterministic meta-test masks (what τ constrains), `sampled` of one draw of its training gates.
Writes OUT.json, OUT.md (command, machine, date, commit, wall time in the header) and
OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import report
from experiments import figures, tables
from smat import config as config_lib
from smat import evaluate, metatrain
from smat.data import spec as spec_lib
from smat.data.samplers import FixedSampler


def point_dir(workdir: str, tau: float, experts: int) -> str:
  return os.path.join(workdir, f"tau{tau:g}_m{experts}")


def train_point(config_path: str, overrides: list[str], workdir: str, tau: float,
                experts: int) -> dict:
  """Meta-train one (τ, M) run to completion (resuming if started); its summary."""
  config = config_lib.load(config_path, overrides + [
      f"--config.experts.target_sparsity={tau}", f"--config.experts.num_experts={experts}"])
  return metatrain.train_and_evaluate(config, workdir)


def add_evaluation_args(parser) -> None:
  """The zero-shot evaluation every point gets: ID and OOD specs, episodes, shape, seed."""
  parser.add_argument("--id", default="glyphs:id", metavar="SPEC,...")
  parser.add_argument("--ood", default="glyphs:ood,fashion_mnist", metavar="SPEC,...")
  parser.add_argument("--episodes", type=int, default=600)
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=5)
  parser.add_argument("--queries", type=int, default=15)
  parser.add_argument("--seed", type=int, default=0)


def evaluation_setup(args):
  """(ID specs, OOD specs, {spec: domains}, sampler) of `add_evaluation_args`'s flags."""
  id_specs, ood_specs = args.id.split(","), args.ood.split(",")
  groups = {s: spec_lib.load_domains(s, seed=args.seed) for s in id_specs + ood_specs}
  return id_specs, ood_specs, groups, FixedSampler(args.ways, args.shots, args.queries)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="smat_glyphs")
  parser.add_argument("--taus", default="0,0.5,0.8,0.9,0.95,0.99")
  parser.add_argument("--experts", default="4,8,16")
  parser.add_argument("--points", default=None, metavar="TAU:M,...",
                      help="an explicit list of points instead of the --taus × --experts grid")
  add_evaluation_args(parser)
  parser.add_argument("--checkpoint", choices=("best", "checkpoints"), default="best",
                      help="the checkpoint every point evaluates: `best` (selected by validation, "
                      "what meta-test uses) or `checkpoints` (the final one)")
  parser.add_argument("--workdir", default="runs/sweep")
  parser.add_argument("--out", required=True)
  args, overrides = report.parse_args(parser, argv)

  start = time.time()
  if args.points:
    grid = [(float(t), int(m)) for t, m in (p.split(":") for p in args.points.split(","))]
  else:
    grid = [(float(t), int(m)) for m in args.experts.split(",") for t in args.taus.split(",")]
  id_specs, ood_specs, groups, sampler = evaluation_setup(args)
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {}
  points, elapsed = saved.get("points", []), saved.get("seconds", 0.0)
  done = {(p["tau"], p["experts"]) for p in points}

  for tau, experts in grid:
    if (tau, experts) in done:
      continue
    workdir = point_dir(args.workdir, tau, experts)
    t0 = time.time()
    summary = train_point(args.config, overrides, workdir, tau, experts)
    train_s = time.time() - t0
    run = metatrain.load_run(workdir, args.checkpoint)
    evaluated = metatrain.describe_checkpoint(workdir, run, args.checkpoint)
    protocol = evaluate.Protocol(sampler, tables.run_image_size(workdir), args.episodes,
                                 args.seed)
    results = evaluate.evaluate(run, groups, protocol)
    mean = lambda specs, key: float(np.mean([results[s][key] for s in specs]))
    sparsity = run.sparsity() or {}
    points.append({"tau": tau, "experts": experts, "workdir": workdir,
                   "id": mean(id_specs, "accuracy"), "id_ci": mean(id_specs, "ci95"),
                   "ood": mean(ood_specs, "accuracy"), "ood_ci": mean(ood_specs, "ci95"),
                   "domains": results,
                   "deployed_sparsity": _mean(sparsity.get("deployed")),
                   "sampled_sparsity": _mean(sparsity.get("sampled")),
                   "sparsity_per_expert": sparsity, "final_step": last_logged(workdir),
                   "evaluated_step": evaluated["step"],
                   "best_val": (summary.get("best") or {}).get("val_accuracy"),
                   "train_seconds": train_s})
    print(f"τ={tau:g} M={experts}: ID {points[-1]['id']:.2f}  OOD {points[-1]['ood']:.2f}",
          flush=True)
    _write(args, argv, points, elapsed + time.time() - start)
  _write(args, argv, points, elapsed + time.time() - start)
  return 0


def last_logged(workdir: str) -> dict:
  """Step and per-expert sparsity figures of the run's last logged training step (the evaluated
  checkpoint is the best-validating one, which may be an earlier epoch)."""
  last = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        last = row
  return {k: last[k] for k in ("step", "expert_sparsity", "sampled_sparsity", "expected_sparsity")
          if k in last}


def _mean(values) -> float | None:
  return None if values is None else float(np.mean(values))


def _cell(value) -> str:
  return "—" if value is None else f"{value:.3f}"


def _write(args, argv, points: list, seconds: float) -> None:
  with open(args.out + ".json", "w") as f:
    json.dump(report.stamped({"args": vars(args), "points": points, "seconds": seconds,
                              "software": evaluate.software_versions()}), f, indent=1)
  lines = [report.provenance("experiments.sweep", argv,
                             f"wall time {seconds / 60:.1f} min; zero-shot "
                             f"{args.ways}-way {args.shots}-shot, {args.episodes} episodes per "
                             f"domain; evaluated checkpoint: {args.checkpoint}/"), "",
           "| τ | M | evaluated step | deployed sparsity | sampled sparsity | ID avg | OOD avg | "
           "best val |", "|---|---|---|---|---|---|---|---|"]
  for p in sorted(points, key=lambda p: (p["experts"], p["tau"])):
    lines.append(f"| {p['tau']:g} | {p['experts']} | {p.get('evaluated_step', '—')} | "
                 f"{_cell(p.get('deployed_sparsity'))} | "
                 f"{_cell(p.get('sampled_sparsity'))} | "
                 f"{p['id']:.2f} ± {p['id_ci']:.2f} | {p['ood']:.2f} ± {p['ood_ci']:.2f} | "
                 f"{p['best_val'] if p['best_val'] is None else round(p['best_val'], 2)} |")
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  figures.plot_tradeoff(points, args.out + ".png")


if __name__ == "__main__":
  sys.exit(main())
