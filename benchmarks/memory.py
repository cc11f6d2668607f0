"""Memory and FLOPs of the meta-training step at paper scale, compiled from shapes without running:
what a ViT-S/16 or ViT-B/16 run needs, in float32 or bfloat16, with the meta-batch at once or in
fewer tasks at a time in sequential chunks (`train.tasks_at_once`), with or without remat.

  python -m benchmarks.memory --config smat_vits16_md --out F     # any machine

Each point is `benchmarks.throughput.compile_only`: the state is built from shapes (no M × |θ|
values), so a CPU with little memory compiles configurations it could not hold. Episode shapes are
WAYSxSUPPORTxQUERY per task, e.g. the typical `10x20x100` and Meta-Dataset's largest bucket
`50x500x500`, which decides whether a run fits (every smaller episode is padded into a bucket no
larger). Temporaries come from the compiling backend's buffer assignment: a CPU's is a guide to a
GPU's, not a copy of it. For the backbone's forward+backward alone (ViT-S/16, 256 images at
128 px) a CPU assigns 9.7 GiB in float32 and 8.1 in bfloat16 where an H100 assigns 6.5 and 4.0,
and the CPU compiler undoes remat of blocks (11.0 GiB with it, 1.05 on the H100), so `--remat`
means something only when compiled for a GPU. Task chunks are a loop, which every backend keeps.
Points are saved as they finish, so an interrupted run resumes. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

from benchmarks import report, throughput
from smat import config as config_lib


def point(config_path: str, overrides: list[str], arch: str, dtype: str, remat: bool,
          at_once: int, episode: str) -> dict:
  ways, support, query = (int(v) for v in episode.split("x"))
  config = config_lib.load(config_path, overrides + [f"--config.backbone.dtype={dtype}",
                                                     f"--config.backbone.remat={remat}",
                                                     f"--config.train.tasks_at_once={at_once}"])
  result = throughput.compile_only(config, ways, support, query, arch)
  result.update(episode=episode, tasks_at_once=at_once)
  result["total_gib"] = result["step_argument_gib"] + result["step_temp_gib"]
  return result


def markdown(points: list[dict], argv: list[str]) -> str:
  lines = [report.provenance("benchmarks.memory", argv), "",
           "| arch | px | dtype | remat | M | tasks | tasks at once "
           "| episode ways×support×query | TFLOP / task (plain) | arguments GiB | step temp GiB "
           "| total GiB | plain temp GiB | compile s |", "|" + "---|" * 14]
  for p in points:
    lines.append(
        f"| {p['arch']} | {p['image_size']} | {p['dtype']} | {p['remat']} | {p['num_experts']} "
        f"| {p['tasks_per_step']} | {p['tasks_at_once'] or 'all'} | {p['episode']} "
        f"| {p['flops_per_task'] / 1e12:.2f} ({p['plain_flops_per_task'] / 1e12:.2f}) "
        f"| {p['step_argument_gib']:.2f} | {p['step_temp_gib']:.1f} | {p['total_gib']:.1f} "
        f"| {p['plain_temp_gib']:.1f} | {p['compile_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--archs", default="vit_s16,vit_b16")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--remat", default="false")
  parser.add_argument("--tasks-at-once", default="0,1",
                      help="train.tasks_at_once values (0: the whole meta-batch at once)")
  parser.add_argument("--episodes", default="10x20x100,50x500x500",
                      help="episode shapes WAYSxSUPPORTxQUERY, comma-separated")
  args, overrides = report.parse_args(parser, argv)
  for episode in args.episodes.split(","):
    if len(episode.split("x")) != 3 or not all(v.isdigit() for v in episode.split("x")):
      parser.error(f"--episodes: {episode!r} is not WAYSxSUPPORTxQUERY, e.g. 10x20x100")
  path = args.out + ".json"
  points = json.load(open(path))["points"] if os.path.exists(path) else []
  done = {(p["arch"], p["dtype"], p["remat"], p["tasks_at_once"], p["episode"]) for p in points}
  grid = itertools.product(args.archs.split(","), args.dtypes.split(","),
                           [r.strip().lower() == "true" for r in args.remat.split(",")],
                           [int(c) for c in args.tasks_at_once.split(",")],
                           args.episodes.split(","))

  def write():
    with open(path, "w") as f:
      json.dump(report.stamped({"args": vars(args), "overrides": overrides, "points": points}),
                f, indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(markdown(points, argv))

  for key in grid:
    if key in done:
      continue
    points.append(point(args.config, overrides, *key))
    print(json.dumps({k: points[-1][k] for k in ("arch", "dtype", "remat", "tasks_at_once",
                                                 "episode", "total_gib")}), flush=True)
    write()
  write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
