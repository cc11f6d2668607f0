"""Episode loader throughput (host side: sample, read, resize, pad, stack meta-batches).

  python -m benchmarks.loader_throughput --config glyphs_small --out loader.json

Prints a markdown table and writes JSON: episodes/s per thread count, episode statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

from benchmarks import report
from smat import config as config_lib
from smat.data import loader


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="glyphs_small")
  parser.add_argument("--split", default="train")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--threads", default="1,2,4")
  parser.add_argument("--out", default=None)
  args, overrides = report.parse_args(parser, argv)
  config = config_lib.load(args.config, overrides)
  source = loader.episode_source(config, args.split)
  result = {
      "config": args.config, "overrides": overrides, "split": args.split,
      "image_size": config.data.image_size, "meta_batch_size": config.data.meta_batch_size,
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
      "episode_stats": loader.describe_plans(source, 500),
      "runs": [loader.throughput(source, config.data.meta_batch_size, args.batches, int(t))
               for t in args.threads.split(",")],
  }
  print("| threads | episodes/s | meta-batches | seconds |\n|---|---|---|---|")
  for run in result["runs"]:
    print(f"| {run['threads']} | {run['episodes_per_s']:.1f} | {run['batches']} | {run['seconds']:.2f} |")
  stats = result["episode_stats"]
  print(f"episodes: {stats['ways_mean']:.1f} ways ({stats['ways_min']}–{stats['ways_max']}), "
        f"{stats['support_mean']:.0f} support and {stats['query_mean']:.0f} query images on average")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report.stamped(result), f, indent=1)
  return result


if __name__ == "__main__":
  main()
