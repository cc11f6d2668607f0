"""XLA:CPU settings one by one on the ViT forward+backward: speed, compile time and how far the
gradients move from the default's, so that a flag is kept only where it wins and leaves the
numbers within the tests' tolerances.

  python -m benchmarks.xla_cpu_flags --arch vit_mini_p4 --image-size 32 --batch 200 \
      --out benchmarks/results/xla_cpu_flags [--flags xla_cpu_enable_fast_math=true,...]

Each setting runs in a new process (XLA reads XLA_FLAGS once): it compiles the jitted gradient
of the mean squared CLS feature (as cpu_side_by_side and backbone_throughput), times
`--repeats` steps after a warm-up and saves the gradients; the parent compares every setting's
gradients with the default's (max abs difference, and relative to the largest gradient). The
settings are the default, each of `--flags` alone, and the model switches (`unroll_blocks`
off, bf16 compute). A busy machine is refused unless `--allow-busy` (the table then says so).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import report

# Candidates found in the installed jaxlib (strings of libjax_common.so), one per row.
DEFAULT_FLAGS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=eltwise",
    "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_enable_fast_min_max=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)

_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from smat.models import vit
config = vit.get_config(spec["arch"], image_size=spec["image_size"], **spec["model"])
params = vit.init(vit.get_config(spec["arch"], image_size=spec["image_size"]), jax.random.key(0))
images = jax.random.normal(jax.random.key(1), (spec["batch"], spec["image_size"], spec["image_size"], 3))
grad = jax.jit(jax.grad(lambda p, x: jnp.mean(vit.forward(p, x, config) ** 2)))
start = time.perf_counter()
compiled = grad.lower(params, images).compile()
compile_s = time.perf_counter() - start
out = compiled(params, images)
jax.block_until_ready(out)
cpu, start = time.process_time(), time.perf_counter()
for _ in range(spec["repeats"]):
  out = compiled(params, images)
jax.block_until_ready(out)
seconds = time.perf_counter() - start
np.savez(spec["grads"], *[np.asarray(g, np.float32) for g in jax.tree.leaves(out)])
print(json.dumps({"compile_s": compile_s, "seconds": seconds, "cpu": time.process_time() - cpu}))
"""


def settings(flags: list[str]) -> list[dict]:
  """The default, each flag alone, and the model's own switches."""
  rows = [{"name": "default", "xla_flags": "", "model": {}}]
  rows += [{"name": f, "xla_flags": f, "model": {}} for f in flags]
  rows += [{"name": "unroll_blocks=False", "xla_flags": "", "model": {"unroll_blocks": False}},
           {"name": "dtype=bfloat16", "xla_flags": "", "model": {"dtype": "bfloat16"}}]
  return rows


def run_setting(setting: dict, args, directory: str) -> dict:
  grads = os.path.join(directory, f"{len(os.listdir(directory))}.npz")
  spec = {"arch": args.arch, "image_size": args.image_size, "batch": args.batch,
          "repeats": args.repeats, "model": setting["model"], "grads": grads}
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), setting["xla_flags"]) if x)
  env["SMAT_COMPILE_CACHE"] = "off"
  done = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(spec)], env=env,
                        capture_output=True, text=True)
  if done.returncode != 0:  # an unknown or unsupported flag: recorded, not fatal
    return {**setting, "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "failed"}
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return {**setting, **result, "images_per_s": args.batch * args.repeats / result["seconds"],
          "cpu_per_wall": result["cpu"] / result["seconds"], "grads": grads}


def grad_difference(a: str, b: str) -> tuple[float, float]:
  """(max abs difference, that ÷ the largest |gradient|) between two saved gradient sets."""
  with np.load(a) as x, np.load(b) as y:
    diff = max(float(np.abs(x[k] - y[k]).max()) for k in x.files)
    scale = max(float(np.abs(x[k]).max()) for k in x.files)
  return diff, diff / scale


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--arch", default="vit_mini_p4")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--flags", default=",".join(f.removeprefix("--") for f in DEFAULT_FLAGS),
                      help="comma-separated XLA flags without their leading --, each tried alone")
  parser.add_argument("--max-load", type=float, default=0.5)
  parser.add_argument("--allow-busy", action="store_true")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  load = report.busy_machine(args.max_load, args.allow_busy)
  if load is None:
    return 2
  started = time.time()
  with tempfile.TemporaryDirectory(prefix="smat-flags-") as directory:
    # Commas separate flags, not the values some flags take (fusion_type=dot,eltwise).
    flags = ["--" + f.removeprefix("--") for f in re.split(r",(?=(?:--)?xla_)", args.flags) if f]
    rows = [run_setting(s, args, directory) for s in settings(flags)]
    base = rows[0]
    for row in rows:
      if "error" not in row and "error" not in base:
        row["grad_max_abs_diff"], row["grad_max_rel_diff"] = grad_difference(base["grads"],
                                                                             row["grads"])
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
    for row in rows:
      row.pop("grads", None)
  from smat import evaluate

  record = {"args": vars(args), "rows": rows, "load_at_start": load,
            "versions": evaluate.software_versions()}
  lines = [report.provenance("benchmarks.xla_cpu_flags", argv,
                             f"wall time {time.time() - started:.0f} s, "
                             f"load average {load:.2f} at the start"
                             + (" (BUSY MACHINE: timings not valid)"
                                if load > args.max_load else "")), "",
           "| setting | images/s | × default | compile s | CPU / wall | max abs Δ grad (relative) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| `{r['name']}` | — | — | — | — | {r['error']} |")
      continue
    delta = (f"{r['grad_max_abs_diff']:.1e} ({r['grad_max_rel_diff']:.1e})"
             if "grad_max_abs_diff" in r else "—")
    lines.append(f"| `{r['name']}` | {r['images_per_s']:.1f} | {r.get('speedup', 1.0):.2f} | "
                 f"{r['compile_s']:.1f} | {r['cpu_per_wall']:.2f} | {delta} |")
  report.write_results(args.out, record, lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
