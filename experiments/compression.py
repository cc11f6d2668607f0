"""Self-Pruner's backbone compression: accuracy against sparsity, with measured speed-up.

  python -m experiments.compression --run runs/bench/pmf --sparsities 0.1,0.2,0.3,0.4,0.5 \\
      --episodes 200 --out experiments/results/compression_glyphs

The meta-tuned model (a PMF run's θ_pre + δ; `--model pre` for its θ_pre) is pruned
structurally — whole attention heads and MLP channels, no retraining — at each target sparsity
s with two sets of per-layer keep rates of mean 1 − s: uniform, and searched by Self-Pruner's
genetic search (`smat.sparsity.evolution.search`, fitness = zero-shot accuracy on the run's
first `--search-episodes` validation episodes). Units are ranked inside a layer by their
first-order importance on those episodes (`smat.sparsity.compress`). Each point reports the
zero-shot ID and OOD accuracy on identical test episodes, the parameters removed (of the heads'
and channels' own, and of the whole model), and the median time of a jitted forward of
`--batch` images through the physically pruned model against the unpruned one in the same code,
timed in alternation. Points are reused, so an interrupted run resumes. Writes OUT.json, OUT.md
(command, machine, date, commit, wall time) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from benchmarks import report
from experiments import figures, sweep, tables
from smat import config as config_lib
from smat import evaluate, metatrain
from smat.models import vit
from smat.sparsity import compress, evolution


def model_params(workdir: str, which: str):
  """(θ, ViTConfig, config) of the run's dense model (`pmf`) or its θ_pre (`pre`)."""
  run = metatrain.load_run(workdir)
  config = config_lib.from_json(os.path.join(workdir, "config.json"))
  theta = run.dense_params() if which == "pmf" else run.theta_pre
  return theta, run.hp.vit, config


def measure_point(theta, vit_config, importance, rates, groups, sampler, image_size, args,
                  images) -> dict:
  """Accuracy, parameters and timing of the model pruned at per-layer keep `rates`."""
  head_counts, channel_counts = compress.kept_counts(rates, vit_config)
  heads = np.asarray(compress.kept_units(importance[0], head_counts))
  channels = np.asarray(compress.kept_units(importance[1], channel_counts))
  zeroed = compress.zero_pruned(theta, heads, channels, vit_config)
  protocol = evaluate.Protocol(sampler, image_size, args.episodes, args.seed)
  results = evaluate.evaluate((zeroed, vit_config), groups, protocol, progress=False)
  small = compress.prune(theta, heads, channels, vit_config)
  unpruned = compress.prune(theta, np.ones_like(heads), np.ones_like(channels), vit_config)
  pruned_s, unpruned_s = compress.time_forwards([small, unpruned], vit_config, images,
                                                args.repeats)
  full = vit.count_params(theta)
  head, channel = compress.unit_sizes(vit_config)
  prunable = vit_config.depth * (vit_config.num_heads * head + vit_config.mlp_dim * channel)
  removed = full - vit.count_params(small)
  return {"rates": [float(r) for r in rates], "heads_kept": heads.sum(1).tolist(),
          "channels_kept": channels.sum(1).tolist(),
          "prunable_sparsity": removed / prunable, "total_sparsity": removed / full,
          "seconds": pruned_s, "unpruned_seconds": unpruned_s, "speedup": unpruned_s / pruned_s,
          "results": {k: {"accuracy": v["accuracy"], "ci95": v["ci95"],
                          "per_episode": v["per_episode"]} for k, v in results.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", default="runs/bench/pmf", help="a PMF meta-train workdir")
  parser.add_argument("--model", choices=("pmf", "pre"), default="pmf",
                      help="prune the meta-tuned θ_pre + δ, or the run's θ_pre")
  parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
  parser.add_argument("--generations", type=int, default=20, help="Self-Pruner search")
  parser.add_argument("--population", type=int, default=30)
  parser.add_argument("--search-episodes", type=int, default=None,
                      help="validation episodes for the importance and each fitness "
                           "(default: the run's val.episodes)")
  parser.add_argument("--batch", type=int, default=256, help="images per timed forward")
  parser.add_argument("--repeats", type=int, default=20, help="timed forwards per model")
  sweep.add_evaluation_args(parser)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  start = time.time()
  id_specs, ood_specs, groups, sampler = sweep.evaluation_setup(args)
  theta, vit_config, config = model_params(args.run, args.model)
  image_size = tables.run_image_size(args.run)
  images = np.random.default_rng(0).integers(0, 256, (args.batch, image_size, image_size, 3),
                                             np.uint8)
  batches = metatrain.validation_batches(config, args.search_episodes)
  importance = compress.unit_importance(theta, batches, vit_config)
  fitness = compress.compression_fitness(theta, vit_config, importance, batches)
  search = evolution.SearchConfig(population=args.population, generations=args.generations)
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {}
  points, elapsed = saved.get("points", []), saved.get("seconds", 0.0)
  done = {(p["sparsity"], p["rates_from"]) for p in points}
  mean = lambda p, specs, key: float(np.mean([p["results"][s][key] for s in specs]))

  def write():
    seconds = elapsed + time.time() - start
    with open(path, "w") as f:
      json.dump(report.stamped({"args": vars(args), "points": points, "seconds": seconds,
                                "device": jax.devices()[0].device_kind,
                                "software": evaluate.software_versions()}), f, indent=1)
    lines = [report.provenance(
                 "experiments.compression", argv, f"wall time {seconds / 60:.1f} min (all "
                 f"invocations); zero-shot {args.ways}-way {args.shots}-shot, {args.episodes} "
                 f"episodes per domain, seed {args.seed}; forward of {args.batch} images at "
                 f"{image_size} px"),
             "",
             "| target s | rates | heads kept | channels kept | params removed (prunable / all) "
             "| val fitness | ID | OOD | forward ms (pruned / unpruned) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["sparsity"], p["rates_from"])):
      lines.append(
          f"| {p['sparsity']:g} | {p['rates_from']} | {p['heads_kept']} | {p['channels_kept']} "
          f"| {p['prunable_sparsity']:.3f} / {p['total_sparsity']:.3f} | {p['fitness']:.2f} "
          f"| {mean(p, id_specs, 'accuracy'):.2f} ± {mean(p, id_specs, 'ci95'):.2f} "
          f"| {mean(p, ood_specs, 'accuracy'):.2f} ± {mean(p, ood_specs, 'ci95'):.2f} "
          f"| {1000 * p['seconds']:.1f} / {1000 * p['unpruned_seconds']:.1f} "
          f"| {p['speedup']:.2f}× |")
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(lines) + "\n")
    figures.plot_compression([{**p, "id": mean(p, id_specs, "accuracy"),
                               "ood": mean(p, ood_specs, "accuracy")} for p in points],
                             args.out + ".png")

  depth = vit_config.depth
  grid = [(0.0, "unpruned")] + [(float(s), kind) for s in args.sparsities.split(",")
                                for kind in ("uniform", "searched")]
  for sparsity, kind in grid:
    if (sparsity, kind) in done:
      continue
    if kind == "searched":
      found = evolution.search(fitness, 1.0 - sparsity, np.ones(depth), args.seed, search,
                               progress=True)
      rates, extra = np.asarray(found["rates"]), {"search": found, "fitness": found["fitness"]}
    else:
      rates = np.full(depth, 1.0 - sparsity)
      extra = {"fitness": fitness(rates)}
    point = measure_point(theta, vit_config, importance, rates, groups, sampler, image_size,
                          args, images)
    points.append({"sparsity": sparsity, "rates_from": kind, **point, **extra})
    print(f"s={sparsity:g} {kind}: ID {mean(points[-1], id_specs, 'accuracy'):.2f} OOD "
          f"{mean(points[-1], ood_specs, 'accuracy'):.2f}, {1000 * point['seconds']:.1f} ms",
          flush=True)
    write()
  write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
