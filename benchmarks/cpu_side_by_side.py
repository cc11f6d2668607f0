"""The project's ViT forward+backward against timm's on the CPU, side by side: the same
architecture, images and loss, in interleaved rounds, on a machine checked to be idle.

  python -m benchmarks.cpu_side_by_side --torch-python /path/to/venv-with-torch/bin/python \
      --arch vit_mini_p4 --image-size 32 --batch 200 --rounds 12 --out benchmarks/results/cpu_side_by_side

torch and timm are not smat dependencies: `--torch-python` names an interpreter that has them
(this one by default). Each framework runs in its own process, set up once (model built,
compiled, warmed up); then every round asks each for `--repeats` timed steps, alternating which
goes first, so that drifts of the machine fall on both. A round also records the 1-minute load
average; a machine busier than `--max-load` at the start is refused (a loaded machine flips the
ranking: under load 6 the PyTorch side slowed 10×, XLA's 3×), unless `--allow-busy`, and then
the table says so. The loss is the mean squared CLS feature (as backbone_throughput's), both in
float32 with one thread per usable core. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import report

# A worker: build, warm up, then answer each "go" line with the seconds of `repeats` steps
# and the process's CPU seconds over them.
_TORCH_WORKER = r"""
import json, os, sys, time
import torch
from timm.models.vision_transformer import VisionTransformer
spec = json.loads(sys.argv[1])
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
print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
  cpu, start = time.process_time(), time.perf_counter()
  for _ in range(spec["repeats"]):
    step()
  print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}), flush=True)
"""

_JAX_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import jax, jax.numpy as jnp
from smat.models import vit
config = vit.get_config(spec["arch"], image_size=spec["image_size"])
params = vit.init(config, jax.random.key(0))
images = jax.random.normal(jax.random.key(1), (spec["batch"], spec["image_size"], spec["image_size"], 3))
grad = jax.jit(jax.grad(lambda p, x: jnp.mean(vit.forward(p, x, config) ** 2)))
for _ in range(3):
  jax.block_until_ready(grad(params, images))
print(json.dumps({"ready": True, "jax": jax.__version__}), flush=True)
for line in sys.stdin:
  cpu, start = time.process_time(), time.perf_counter()
  for _ in range(spec["repeats"]):
    out = grad(params, images)
  jax.block_until_ready(out)
  print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}), flush=True)
"""


class Worker:
  """One framework's process, set up and waiting for rounds."""

  def __init__(self, name: str, python: str, code: str, spec: dict):
    self.name = name
    self.process = subprocess.Popen([python, "-c", code, json.dumps(spec)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise SystemExit(f"error: the {self.name} worker stopped (see its error above)")
    return json.loads(line)

  def round(self) -> dict:
    self.process.stdin.write("go\n")
    self.process.stdin.flush()
    return self._read()

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)


def load_average() -> float:
  return os.getloadavg()[0]


def summary(rows: list[dict], batch: int, repeats: int) -> dict:
  """Median images/s per framework, the median ratio (ours ÷ timm's) and its range."""
  rate = lambda r, k: batch * repeats / r[k]["seconds"]
  ours, theirs = [rate(r, "smat") for r in rows], [rate(r, "timm") for r in rows]
  ratios = [a / b for a, b in zip(ours, theirs)]
  cpu = lambda k: float(np.median([r[k]["cpu"] / r[k]["seconds"] for r in rows]))
  return {"smat_images_per_s": float(np.median(ours)), "timm_images_per_s": float(np.median(theirs)),
          "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios),
          "ratio_max": max(ratios), "smat_cpu_per_wall": cpu("smat"),
          "timm_cpu_per_wall": cpu("timm"),
          "load_max": max(r["load"] for r in rows)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--torch-python", default=sys.executable)
  parser.add_argument("--arch", default="vit_mini_p4")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=200)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--max-load", type=float, default=0.5)
  parser.add_argument("--allow-busy", action="store_true")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  from smat.models import vit

  busy = report.busy_machine(args.max_load, args.allow_busy)
  if busy is None:
    return 2
  c = vit.get_config(args.arch, image_size=args.image_size)
  threads = len(os.sched_getaffinity(0))
  spec = {"arch": args.arch, "image_size": args.image_size, "patch": c.patch_size,
          "width": c.width, "depth": c.depth, "heads": c.num_heads, "mlp": c.mlp_dim,
          "batch": args.batch, "repeats": args.repeats, "threads": threads}
  started = time.time()
  workers = {"smat": Worker("smat", sys.executable, _JAX_WORKER, spec),
             "timm": Worker("timm", args.torch_python, _TORCH_WORKER, spec)}
  rows = []
  try:
    for i in range(args.rounds):
      order = ["smat", "timm"] if i % 2 == 0 else ["timm", "smat"]
      row = {"round": i, "first": order[0], "load": load_average()}
      for name in order:
        row[name] = workers[name].round()
      rows.append(row)
  finally:
    for w in workers.values():
      w.close()
  result = {"spec": spec, "rows": rows, "summary": summary(rows, args.batch, args.repeats),
            "load_at_start": busy, "allowed_busy": busy > args.max_load,
            "workers": {k: w.info for k, w in workers.items()}}
  from smat import evaluate

  result["versions"] = evaluate.software_versions()
  s = result["summary"]
  lines = [report.provenance("benchmarks.cpu_side_by_side", argv,
                             f"wall time {time.time() - started:.0f} s, "
                             f"{args.rounds} interleaved rounds of {args.repeats} steps, "
                             f"load average {busy:.2f} at the start, {s['load_max']:.2f} at most"
                             + (" (BUSY MACHINE: not a valid comparison)"
                                if result["allowed_busy"] else "")), "",
           "| fwd+bwd, float32 | images/s (median) | CPU / wall |", "|---|---|---|",
           f"| smat (jax {workers['smat'].info['jax']}) | {s['smat_images_per_s']:.1f} | "
           f"{s['smat_cpu_per_wall']:.2f} |",
           f"| timm (torch {workers['timm'].info['torch']}) | {s['timm_images_per_s']:.1f} | "
           f"{s['timm_cpu_per_wall']:.2f} |", "",
           f"smat ÷ timm: {s['ratio_median']:.2f} (median over rounds; range "
           f"{s['ratio_min']:.2f}–{s['ratio_max']:.2f}); {args.arch}, {args.image_size} px, "
           f"batch {args.batch}, {threads} threads each."]
  report.write_results(args.out, result, lines)
  return 0


if __name__ == "__main__":
  sys.exit(main())
