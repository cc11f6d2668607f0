"""Cold and warm compile time of a method's meta-training step and its zero-shot evaluator, with
the persistent compilation cache the CLI turns on (`smat.compile_cache`).

  python -m benchmarks.compile_time --config smat_glyphs --out benchmarks/results/compile_time_cpu

Each phase is a new Python process, as a new run is: `cold` starts from an empty cache folder,
`warm` from the folder `cold` filled, `off` has the cache turned off (what every run paid before
the cache). A phase builds the step from shapes (no weights or data needed), lowers it on
synthetic episodes of the config's shape and times lowering and compiling apart: the cache
saves the compile, never the trace and lowering. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import report

PHASES = ("off", "cold", "warm")


def measure_in_this_process(config_spec: str, overrides: list[str]) -> dict:
  """Seconds to lower and to compile the step and the zero-shot evaluator, here."""
  import jax
  from jax import monitoring

  from benchmarks.throughput import abstract_setup, synthetic_episodes
  from smat import compile_cache, metatrain
  from smat import config as config_lib
  from smat.meta import step as meta_step
  from smat.models import checkpoint

  hits = []
  monitoring.register_event_listener(
      lambda name, **_: hits.append(name) if name.endswith("/cache_hits") else None)
  cache = compile_cache.enable()
  config = config_lib.load(config_spec, overrides)
  theta_pre, vit_config = checkpoint.load_from_config(config.backbone)  # as a run compiles it
  state, hp, optimizer = abstract_setup(config, theta_pre, vit_config)
  d = config.data
  train = synthetic_episodes(d.meta_batch_size, d.ways, d.ways * d.shots, d.ways * d.queries,
                             d.image_size)
  val = synthetic_episodes(config.val.batch_size, d.ways, d.ways * d.shots, d.ways * d.queries,
                           d.image_size)  # validation episodes: the training shape, val batches
  programs = {
      "step": lambda: meta_step.jit_step(hp, optimizer).lower(state, train, jax.random.key(0),
                                                              theta_pre),
      "zero_shot": lambda: metatrain._zero_shot.lower(
          state.params, state.router_state, val, theta_pre, 1.0, hp=hp),
  }
  out = {"cache": cache}
  for name, lower in programs.items():
    start = time.perf_counter()
    lowered = lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    out[name] = {"lower_s": lowered_at - start, "compile_s": time.perf_counter() - lowered_at}
  out["cache_hits"] = len(hits)
  return out


def run_phase(phase: str, cache_dir: str, config_spec: str, overrides: list[str]) -> dict:
  """One phase in a fresh process (so nothing compiled in memory carries over)."""
  env = {**os.environ, "SMAT_COMPILE_CACHE": "off" if phase == "off" else cache_dir}
  code = ("import json, sys; from benchmarks.compile_time import measure_in_this_process as m; "
          "print(json.dumps(m(sys.argv[1], sys.argv[2:])))")
  start = time.perf_counter()
  done = subprocess.run([sys.executable, "-c", code, config_spec, *overrides], env=env,
                        check=True, capture_output=True, text=True)
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return {"phase": phase, "process_s": time.perf_counter() - start, **result}


def markdown(rows: list[dict]) -> str:
  lines = ["| phase | step: lower s | step: compile s | zero-shot: lower s | "
           "zero-shot: compile s | cache hits | process s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['phase']} | {r['step']['lower_s']:.1f} | {r['step']['compile_s']:.1f} | "
                 f"{r['zero_shot']['lower_s']:.1f} | {r['zero_shot']['compile_s']:.1f} | "
                 f"{r['cache_hits']} | {r['process_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="smat_glyphs")
  parser.add_argument("--phases", default=",".join(PHASES))
  parser.add_argument("--out", required=True)
  args, overrides = report.parse_args(parser, argv)
  started = time.time()
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory(prefix="smat-compile-cache-") as cache_dir:
    rows = [run_phase(p, cache_dir, args.config, overrides) for p in args.phases.split(",")]
  for r in rows:
    r.pop("cache", None)  # a temporary folder, gone now
  from smat import evaluate

  record = {"config": args.config, "overrides": overrides, "rows": rows,
            "load_average_1min_at_start": load, "versions": evaluate.software_versions()}
  report.write_results(args.out, record, [report.provenance(
      "benchmarks.compile_time", argv, f"wall time {time.time() - started:.0f} s, 1-minute load "
      f"average at the start {load:.2f} (an idle machine reads below 0.3)"), "", markdown(rows)])
  return 0


if __name__ == "__main__":
  sys.exit(main())
