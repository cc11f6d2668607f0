"""Learned vs hand-designed masks at matched sparsity: SMAT's gates against random, MAP,
influence (PLATON), circuit and Self-Pruner-budgeted masks, in the same trainer on the same
episodes.

  python -m experiments.strategies --taus 0.9,0.95 \\
      --strategies learned,random,map,influence,circuit,selfpruner --pmf runs/bench/pmf \\
      --episodes 200 --out experiments/results/strategies_glyphs

For each τ and strategy: `smat meta-train` of the config with experts.target_sparsity = τ and
experts.masks = the strategy ("learned": SMAT's gates), then zero-shot evaluation on the ID and
OOD specs on identical episodes, and paired differences of every strategy against learned.
Self-Pruner's per-block rates are searched first (`smat.sparsity.evolution.search`; fitness =
zero-shot accuracy on the config's validation episodes of θ_pre + m ⊙ δ with δ the dense
meta-tuned delta of the PMF run `--pmf`). Runs, searches and cells are reused, so an
interrupted run resumes. Writes OUT.json, OUT.md (command, machine, date, commit, wall time)
and OUT_density.png (meta-test mask density per parameter type, each strategy next to SMAT's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import report
from experiments import figures, sweep, tables
from smat import config as config_lib
from smat import evaluate, metatrain, plots
from smat.meta import experts
from smat.sparsity import budgeted, evolution

LABELS = {"learned": "SMAT (learned)", "random": "random", "map": "MAP",
          "influence": "influence", "circuit": "circuit", "selfpruner": "Self-Pruner"}


def search_rates(config, pmf_workdir: str, tau: float, search: evolution.SearchConfig,
                 seed: int, episodes: int | None = None) -> dict:
  """Self-Pruner's per-block densities for budget 1 − τ, scored on the first `episodes`
  validation episodes (default: the config's `val.episodes`)."""
  pmf = metatrain.load_run(pmf_workdir)
  exclude = experts.EMBEDDINGS if config.experts.freeze_embeddings else ()
  batches = metatrain.validation_batches(config, episodes)
  fitness = budgeted.budget_fitness(pmf.theta_pre, pmf.params["delta"], pmf.hp.vit, batches,
                                    1.0 - tau, exclude)
  sizes = budgeted.group_sizes(pmf.params["delta"], exclude)
  mean = (1.0 - tau) * experts.total_size(pmf.params["delta"]) / sizes.sum()
  return evolution.search(fitness, mean, sizes, seed, search, progress=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="smat_glyphs")
  parser.add_argument("--taus", default="0.9,0.95")
  parser.add_argument("--strategies", default=",".join(LABELS))
  parser.add_argument("--pmf", default="runs/bench/pmf",
                      help="a PMF workdir: its dense δ scores Self-Pruner's budgets")
  parser.add_argument("--generations", type=int, default=20, help="Self-Pruner search")
  parser.add_argument("--population", type=int, default=30)
  parser.add_argument("--search-episodes", type=int, default=None,
                      help="validation episodes per fitness (default: the config's)")
  sweep.add_evaluation_args(parser)
  parser.add_argument("--workdir", default="runs/strategies")
  parser.add_argument("--out", required=True)
  args, overrides = report.parse_args(parser, argv)

  start = time.time()
  id_specs, ood_specs, groups, sampler = sweep.evaluation_setup(args)
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {}
  cells, searches = saved.get("cells", {}), saved.get("searches", {})
  densities, elapsed = saved.get("density", {}), saved.get("seconds", 0.0)
  search = evolution.SearchConfig(population=args.population, generations=args.generations)

  def write():
    seconds = elapsed + time.time() - start
    with open(path, "w") as f:
      json.dump(report.stamped({"args": vars(args), "cells": cells, "searches": searches,
                                "density": densities, "seconds": seconds,
                                "software": evaluate.software_versions()}), f, indent=1)
    parts = [report.provenance(
        "experiments.strategies", argv, f"wall time {seconds / 60:.1f} min (all invocations); "
        f"zero-shot {args.ways}-way {args.shots}-shot, {args.episodes} episodes per domain, "
        f"seed {args.seed}")]
    panels = {}  # density figure: one panel per τ, one bar per strategy
    for tau in args.taus.split(","):
      names = [n for n in cells if n.endswith(f"τ={tau}")]
      if not names:
        continue
      panels[f"τ = {tau}"] = {n.removesuffix(f" τ={tau}"): densities[n] for n in names
                              if n in densities}
      learned = f"{LABELS['learned']} τ={tau}"
      parts += [f"\n### τ = {tau}\n", tables.markdown(cells, id_specs, ood_specs, names)]
      if learned in cells and len(names) > 1:
        pairs = [(learned, n) for n in names if n != learned]
        parts += ["\nLearned minus each strategy on the identical episodes (mean ± 95% CI):\n",
                  tables.paired_markdown(cells, id_specs, ood_specs, pairs)]
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(parts) + "\n")
    if densities:
      figures.plot_density_comparison(panels, args.out + "_density.png",
                                      "meta-test mask density by parameter type (mean of experts)")

  for tau_text in args.taus.split(","):
    tau = float(tau_text)
    for strategy in args.strategies.split(","):
      name = f"{LABELS[strategy]} τ={tau_text}"
      if name in cells and len(cells[name]) == len(groups):
        continue
      extra_overrides = [f"--config.experts.masks={strategy}"]
      if strategy == "selfpruner":
        if tau_text not in searches:
          config = config_lib.load(args.config, overrides)
          searches[tau_text] = search_rates(config, args.pmf, tau, search, args.seed,
                                            args.search_episodes)
          write()
        rates = ",".join(f"{r:.6f}" for r in searches[tau_text]["rates"])
        extra_overrides.append(f"--config.sparsity.rates={rates}")
      workdir = os.path.join(args.workdir, f"{strategy}_tau{tau_text}")
      sweep.train_point(args.config, overrides + extra_overrides, workdir, tau,
                        config_lib.load(args.config, overrides).experts.num_experts)
      run = metatrain.load_run(workdir)
      protocol = evaluate.Protocol(sampler, tables.run_image_size(workdir), args.episodes,
                                   args.seed)
      results = evaluate.evaluate(run, groups, protocol)
      cells[name] = results
      densities[name] = plots.density_summary(plots.meta_test_density(run),
                                              run.theta_pre)["by_type"]
      mean = lambda specs: np.mean([results[s]["accuracy"] for s in specs])
      print(f"{name}: ID {mean(id_specs):.2f}  OOD {mean(ood_specs):.2f}", flush=True)
      write()
  write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
