"""Where the CPU time of a ViT forward+backward goes, in XLA and in PyTorch: per-op profiles of
the same step as `cpu_side_by_side` (the project's ViT and timm's, same architecture, batch and
loss), grouped into the same kinds of work.

  python -m benchmarks.cpu_profile --torch-python /path/to/venv-with-torch/bin/python \
      --arch vit_mini_p4 --image-size 32 --batch 200 --out benchmarks/results/cpu_profile

XLA: `jax.profiler` traces `--steps` steps; each executed op (a fusion, a dot, a copy) is mapped
through the compiled HLO's metadata to the JAX primitive and Flax module it came from, forward or
backward (`transpose` in its name). PyTorch: `torch.profiler` self CPU time per aten op. Kinds:
matmul (dots, the patch convolution; PyTorch's fused attention kernel is counted as attention),
softmax (the attention's max/exp/sum/div), layernorm, gelu + residual (elementwise work of the
block outside attention and the norms), layout (transposes, reshapes, copies, concatenations),
other. Times are summed over threads (a 2-thread op counts twice), so shares compare across
frameworks while the wall time per step is reported beside them. Writes OUT.json and OUT.md;
refuses a busy machine (`--max-load`) unless `--allow-busy`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

KINDS = ("matmul", "attention (fused)", "softmax", "layernorm", "gelu + residual", "layout",
         "other")
_LAYOUT = {"transpose", "reshape", "copy", "concatenate", "slice", "pad", "broadcast_in_dim",
           "split", "squeeze", "expand_dims", "dynamic_slice", "dynamic_update_slice"}
_SOFTMAX = {"reduce_max", "exp", "sub", "div", "reduce_sum", "max", "stop_gradient"}


def xla_kind(op_name: str) -> str:
  """Kind of work of one XLA op, from its metadata op_name (…/blocks/attn/reduce_max)."""
  parts = op_name.split("/")
  primitive = parts[-1]
  if primitive in ("dot_general", "conv_general_dilated"):
    return "matmul"
  if primitive in _LAYOUT:
    return "layout"
  if any(p.startswith("norm") for p in parts):
    return "layernorm"
  if "attn" in parts and primitive in _SOFTMAX | {"mul", "add_any", "neg"}:
    return "softmax"
  if "blocks" in parts:
    return "gelu + residual"
  return "other"


def torch_kind(name: str) -> str:
  """Kind of work of one aten op (self time)."""
  n = name.removeprefix("aten::")
  if "scaled_dot_product" in n or "flash_attention" in n:
    return "attention (fused)"
  if n in ("addmm", "mm", "bmm", "matmul", "linear", "convolution", "_convolution",
           "mkldnn_convolution", "convolution_backward", "baddbmm"):
    return "matmul"
  if "softmax" in n:
    return "softmax"
  if "layer_norm" in n:
    return "layernorm"
  if "gelu" in n or n in ("add", "add_", "mul", "mul_", "pow", "mean", "sum", "div"):
    return "gelu + residual"
  if n in ("copy_", "clone", "contiguous", "transpose", "permute", "reshape", "view", "t",
           "cat", "expand", "unsafe_split", "split", "select", "slice", "unbind", "as_strided",
           "_reshape_alias", "flatten", "empty_like", "zeros_like", "empty", "fill_", "zero_"):
    return "layout"
  return "other"


_JAX_PROFILE = r"""
import collections, glob, gzip, json, re, shutil, sys, tempfile, time
spec = json.loads(sys.argv[1])
import jax, jax.numpy as jnp
from smat.models import vit
from benchmarks.cpu_profile import xla_kind
config = vit.get_config(spec["arch"], image_size=spec["image_size"])
params = vit.init(config, jax.random.key(0))
images = jax.random.normal(jax.random.key(1), (spec["batch"], spec["image_size"], spec["image_size"], 3))
grad = jax.jit(jax.grad(lambda p, x: jnp.mean(vit.forward(p, x, config) ** 2)))
hlo = grad.lower(params, images).compile().as_text()
op_name = {m.group(1): m.group(2) for m in
           re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]+)\"", hlo)}
for _ in range(3):
  jax.block_until_ready(grad(params, images))
start = time.perf_counter()
for _ in range(spec["steps"]):
  jax.block_until_ready(grad(params, images))
wall = (time.perf_counter() - start) / spec["steps"]
trace_dir = tempfile.mkdtemp()
jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
for _ in range(spec["steps"]):
  jax.block_until_ready(grad(params, images))
jax.profiler.stop_trace()
path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[-1]
events = json.load(gzip.open(path))
events = events["traceEvents"] if isinstance(events, dict) else events
kinds, ops = collections.Counter(), collections.Counter()
for e in events:
  if e.get("ph") == "X" and e.get("name") in op_name:
    name = op_name[e["name"]]
    direction = "bwd" if "transpose" in name else "fwd"
    kinds[xla_kind(name)] += e["dur"] / 1e3 / spec["steps"]
    ops[direction + " " + "/".join(p for p in name.split("/")[-3:])] += e["dur"] / 1e3 / spec["steps"]
shutil.rmtree(trace_dir, ignore_errors=True)
print(json.dumps({"framework": "jax " + jax.__version__, "wall_ms": wall * 1e3, "kinds_ms": kinds,
                  "top_ops_ms": dict(ops.most_common(15))}))
"""

_TORCH_PROFILE = r"""
import collections, json, sys, time
spec = json.loads(sys.argv[1])
import torch
from timm.models.vision_transformer import VisionTransformer
sys.path.insert(0, spec["root"])
from benchmarks.cpu_profile import torch_kind
torch.set_num_threads(spec["threads"])
model = VisionTransformer(img_size=spec["image_size"], patch_size=spec["patch"], embed_dim=spec["width"],
                          depth=spec["depth"], num_heads=spec["heads"], mlp_ratio=spec["mlp"] / spec["width"],
                          qkv_bias=True, num_classes=0)
images = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"])
def step():
  model.zero_grad(set_to_none=True)
  model(images).pow(2).mean().backward()
for _ in range(3):
  step()
start = time.perf_counter()
for _ in range(spec["steps"]):
  step()
wall = (time.perf_counter() - start) / spec["steps"]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
  for _ in range(spec["steps"]):
    step()
kinds, ops = collections.Counter(), collections.Counter()
for e in prof.key_averages():
  if e.key.startswith("aten::"):
    ms = e.self_cpu_time_total / 1e3 / spec["steps"]
    kinds[torch_kind(e.key)] += ms
    ops[e.key] += ms
print(json.dumps({"framework": "torch " + torch.__version__, "wall_ms": wall * 1e3,
                  "kinds_ms": kinds, "top_ops_ms": dict(ops.most_common(15))}))
"""


def run_profile(python: str, code: str, spec: dict) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([python, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                       env=env)
  if out.returncode:
    sys.stderr.write(out.stderr[-3000:])
    raise SystemExit(f"error: the profile under {python} failed (its error is above)")
  return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(profiles: dict) -> list[str]:
  """The kinds of work side by side, then each framework's largest ops."""
  names = list(profiles)
  lines = ["| kind of work | " + " | ".join(f"{n} ms/step (share)" for n in names) + " |",
           "|---|" + "---|" * len(names)]
  totals = {n: sum(p["kinds_ms"].values()) for n, p in profiles.items()}
  for kind in KINDS:
    cells = [f"{p['kinds_ms'].get(kind, 0.0):.1f} ({100 * p['kinds_ms'].get(kind, 0.0) / totals[n]:.0f}%)"
             for n, p in profiles.items()]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines.append("| **op time (all threads)** | " + " | ".join(f"**{totals[n]:.1f}**" for n in names)
               + " |")
  lines.append("| wall time per step | " + " | ".join(f"{p['wall_ms']:.1f}" for p in profiles.values())
               + " |")
  for n, p in profiles.items():
    lines += ["", f"Largest ops of {n} ({p['framework']}), ms/step:", ""]
    lines += [f"- {op}: {ms:.1f}" for op, ms in p["top_ops_ms"].items()]
  return lines


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch-python", default=sys.executable)
  parser.add_argument("--arch", default="vit_mini_p4")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=200)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--max-load", type=float, default=0.5)
  parser.add_argument("--allow-busy", action="store_true")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  from benchmarks import report  # jax: not needed by the PyTorch side, which imports the kinds
  from smat.models import vit

  busy = report.busy_machine(args.max_load, args.allow_busy)
  if busy is None:
    return 2
  c = vit.get_config(args.arch, image_size=args.image_size)
  spec = {"arch": args.arch, "image_size": args.image_size, "patch": c.patch_size,
          "width": c.width, "depth": c.depth, "heads": c.num_heads, "mlp": c.mlp_dim,
          "batch": args.batch, "steps": args.steps, "threads": len(os.sched_getaffinity(0)),
          "root": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  started = time.time()
  profiles = {"smat": run_profile(sys.executable, _JAX_PROFILE, spec),
              "timm": run_profile(args.torch_python, _TORCH_PROFILE, spec)}
  from smat import evaluate

  result = {"spec": spec, "profiles": profiles, "load_at_start": busy,
            "allowed_busy": busy > args.max_load, "versions": evaluate.software_versions()}
  lines = [report.provenance("benchmarks.cpu_profile", argv,
                             f"wall time {time.time() - started:.0f} s, "
                             f"load average {busy:.2f} at the start"
                             + (" (BUSY MACHINE: timings not valid)" if result["allowed_busy"]
                                else "")), "",
           f"{args.arch}, {args.image_size} px, batch {args.batch}, float32 fwd+bwd, "
           f"{spec['threads']} threads; {args.steps} profiled steps each.", ""]
  report.write_results(args.out, result, lines + markdown(profiles))
  return 0


if __name__ == "__main__":
  sys.exit(main())
