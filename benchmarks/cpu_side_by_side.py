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

`--workload smat_step` times one SMAT meta-training step instead, in tasks/s: smat's own jitted
step (`benchmarks.throughput._compile`) on `--config` (default smat_glyphs) with a random-init
`--arch` backbone, against a PyTorch/timm version of the same step (benchmarks/torch_smat_step.py),
which gets its hyper-parameters from the smat config (`smat_step_spec`):

  python -m benchmarks.cpu_side_by_side --workload smat_step --torch-python /work/torch_venv/bin/python --rounds 8 --out benchmarks/results/cpu_side_by_side_smat_step
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import pathlib
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


# The smat_step workload's JAX side: the project's jitted step as benchmarks.throughput compiles
# and runs it, on synthetic episodes of the config's shape.
_JAX_SMAT_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
import jax
from benchmarks import throughput
from smat import config as config_lib
config = config_lib.load(spec["config"])
e = spec["episode"]
c = throughput._compile(config, e["ways"], e["support"], e["query"], spec["backbone"]["arch"])
holder = {"state": c["state"]}
def steps(n):
  for _ in range(n):
    holder["state"], metrics = c["step"](holder["state"], c["episodes"], c["rng"], c["theta_pre"])
  return jax.block_until_ready(metrics)
losses = [float(steps(1)["loss"]) for _ in range(spec["warmup"])]
print(json.dumps({"ready": True, "jax": jax.__version__, "warmup_losses": losses,
                  "compile_seconds": c["compile_seconds"]}), flush=True)
for line in sys.stdin:
  cpu, start = time.process_time(), time.perf_counter()
  steps(spec["repeats"])
  print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}), flush=True)
"""
TORCH_SMAT_STEP = pathlib.Path(__file__).with_name("torch_smat_step.py")
WARMUP_STEPS = 3  # the first steps are slow while the process heap grows


def smat_step_spec(config, arch: str, threads: int, repeats: int) -> dict:
  """What both sides of the smat_step workload run, read from the smat config the way smat's
  step reads it (`metatrain.hyper`, `metatrain.schedule_steps`), for torch_smat_step.py, which
  cannot import smat. Refuses what that file does not implement."""
  from smat import metatrain
  from smat.errors import SmatError
  from smat.meta import experts, gates, router
  from smat.models import vit

  v = vit.get_config(arch, dtype=config.backbone.dtype)
  hp = metatrain.hyper(config, v)
  d, o = config.data, config.optim
  unsupported = {
      "method": hp.method != "smat", "experts.masks": hp.experts.mask_strategy is not None,
      "experts.structured": hp.experts.structured,
      "experts.freeze_embeddings": hp.experts.freeze_embeddings,
      "optim.schedule": o.schedule != "epoch", "backbone.dtype": v.dtype != "float32",
      "data.sampler": d.sampler != "fixed", "data.image_size": d.image_size != v.image_size,
      "backbone": v.layer_scale or v.registers > 0}
  if any(unsupported.values()):
    raise SmatError(f"the smat_step workload's PyTorch side runs SMAT with learned unstructured "
                    f"gates, the epoch schedule, float32 and fixed episodes at the backbone's "
                    f"image size; not {[k for k, bad in unsupported.items() if bad]}")
  steps_per_epoch, _ = metatrain.schedule_steps(config)
  plain = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # tuples → lists
  return {
      "backbone": {"arch": arch, "image_size": v.image_size, "patch": v.patch_size,
                   "width": v.width, "depth": v.depth, "heads": v.num_heads, "mlp": v.mlp_dim,
                   "layer_norm_eps": v.layer_norm_eps, "mean": list(v.mean), "std": list(v.std)},
      "episode": {"tasks": d.meta_batch_size, "ways": d.ways, "support": d.ways * d.shots,
                  "query": d.ways * d.queries},
      "experts": {"num_experts": hp.experts.num_experts,
                  "target_sparsity": hp.experts.target_sparsity,
                  "gate_noise": hp.experts.gate_noise,
                  "gate_init_std": inspect.signature(experts.init_gates).parameters["std"].default,
                  "beta": gates.BETA, "zeta": gates.ZETA, "gamma": gates.GAMMA,
                  "log_alpha_min": gates.LOG_ALPHA_MIN, "log_alpha_max": gates.LOG_ALPHA_MAX},
      "loss": plain(hp.loss),
      "router": {"skills": router.NUM_SKILLS, "heads": router.NUM_HEADS,
                 "mlp_ratio": router.MLP_RATIO, "layer_norm_eps": router.LAYER_NORM_EPS,
                 "init_power_iterations": router.INIT_POWER_ITERATIONS,
                 "temperature_start": hp.temperature.start,
                 "temperature_floor": hp.temperature.floor,
                 "temperature_decay_tasks": hp.temperature.decay_tasks},
      "optim": {**{k: o[k] for k in (
          "delta_lr", "delta_momentum", "delta_weight_decay", "gate_lr", "gate_clip",
          "lambda_lr", "router_lr", "router_weight_decay", "router_clip", "warmup_epochs",
          "cosine_epochs", "first_epoch_lr")}, "steps_per_epoch": steps_per_epoch},
      "augment": None if hp.augment is None else plain(hp.augment),
      "seed": config.seed, "warmup": WARMUP_STEPS, "threads": threads, "repeats": repeats}


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


def summary(rows: list[dict], batch: int, repeats: int, names=("smat", "timm"),
            unit: str = "images") -> dict:
  """Median `unit`/s per framework (`batch` of them per step), the median ratio (ours ÷ the
  other's, `names` in that order) and its range."""
  a, b = names
  rate = lambda r, k: batch * repeats / r[k]["seconds"]
  ours, theirs = [rate(r, a) for r in rows], [rate(r, b) for r in rows]
  ratios = [x / y for x, y in zip(ours, theirs)]
  cpu = lambda k: float(np.median([r[k]["cpu"] / r[k]["seconds"] for r in rows]))
  return {f"{a}_{unit}_per_s": float(np.median(ours)),
          f"{b}_{unit}_per_s": float(np.median(theirs)),
          "ratio_median": float(np.median(ratios)), "ratio_min": min(ratios),
          "ratio_max": max(ratios), f"{a}_cpu_per_wall": cpu(a),
          f"{b}_cpu_per_wall": cpu(b),
          "load_max": max(r["load"] for r in rows)}


def interleaved_rounds(workers: dict[str, Worker], rounds: int) -> list[dict]:
  """`rounds` rounds of timed steps from every worker, which goes first alternating, each
  round with the load average at its start; the workers are closed after."""
  names, rows = list(workers), []
  try:
    for i in range(rounds):
      order = names if i % 2 == 0 else names[::-1]
      row = {"round": i, "first": order[0], "load": load_average()}
      for name in order:
        row[name] = workers[name].round()
      rows.append(row)
  finally:
    for w in workers.values():
      w.close()
  return rows


def _protocol(args, busy: float, started: float, s: dict, allowed_busy: bool) -> str:
  """The table header's account of how it was timed."""
  return (f"wall time {time.time() - started:.0f} s, "
          f"{args.rounds} interleaved rounds of {args.repeats} steps, "
          f"load average {busy:.2f} at the start, {s['load_max']:.2f} at most"
          + (" (BUSY MACHINE: not a valid comparison)" if allowed_busy else ""))


def smat_step_main(args, argv, busy: float) -> int:
  """The smat_step workload: smat's jitted SMAT step against torch_smat_step.py's."""
  from smat import config as config_lib
  from smat import evaluate

  config = config_lib.load(args.config)
  threads = len(os.sched_getaffinity(0))
  spec = {"config": args.config, **smat_step_spec(config, args.arch, threads, args.repeats)}
  started = time.time()
  workers = {"smat": Worker("smat", sys.executable, _JAX_SMAT_WORKER, spec),
             "torch": Worker("torch", args.torch_python, TORCH_SMAT_STEP.read_text(), spec)}
  rows = interleaved_rounds(workers, args.rounds)
  e, b = spec["episode"], spec["backbone"]
  s = summary(rows, e["tasks"], args.repeats, ("smat", "torch"), "tasks")
  result = {"workload": "smat_step", "spec": spec, "rows": rows, "summary": s,
            "load_at_start": busy, "allowed_busy": busy > args.max_load,
            "workers": {k: w.info for k, w in workers.items()},
            "versions": evaluate.software_versions()}
  info = result["workers"]
  lines = [report.provenance("benchmarks.cpu_side_by_side", argv,
                             _protocol(args, busy, started, s, result["allowed_busy"])), "",
           "| SMAT meta-training step, float32 | tasks/s (median) | CPU / wall |", "|---|---|---|",
           f"| smat (jax {info['smat']['jax']}) | {s['smat_tasks_per_s']:.2f} | "
           f"{s['smat_cpu_per_wall']:.2f} |",
           f"| torch (torch {info['torch']['torch']}, timm {info['torch']['timm']}) | "
           f"{s['torch_tasks_per_s']:.2f} | {s['torch_cpu_per_wall']:.2f} |", "",
           f"smat ÷ torch: {s['ratio_median']:.2f} (median over rounds; range "
           f"{s['ratio_min']:.2f}–{s['ratio_max']:.2f}); workload smat_step: one SMAT "
           f"meta-training step of {args.config} ({e['tasks']} tasks of {e['ways']}-way, "
           f"{e['support']} support and {e['query']} query images, "
           f"M = {spec['experts']['num_experts']} experts), random-init {b['arch']}, "
           f"{b['image_size']} px, {threads} threads each."]
  report.write_results(args.out, result, lines)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", choices=("vit", "smat_step"), default="vit",
                      help="vit: the ViT forward+backward (images/s); smat_step: one SMAT "
                           "meta-training step (tasks/s)")
  parser.add_argument("--config", default="smat_glyphs",
                      help="smat_step: the smat config whose step is timed")
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
  if args.workload == "smat_step":
    return smat_step_main(args, argv, busy)
  c = vit.get_config(args.arch, image_size=args.image_size)
  threads = len(os.sched_getaffinity(0))
  spec = {"arch": args.arch, "image_size": args.image_size, "patch": c.patch_size,
          "width": c.width, "depth": c.depth, "heads": c.num_heads, "mlp": c.mlp_dim,
          "batch": args.batch, "repeats": args.repeats, "threads": threads}
  started = time.time()
  workers = {"smat": Worker("smat", sys.executable, _JAX_WORKER, spec),
             "timm": Worker("timm", args.torch_python, _TORCH_WORKER, spec)}
  rows = interleaved_rounds(workers, args.rounds)
  result = {"spec": spec, "rows": rows, "summary": summary(rows, args.batch, args.repeats),
            "load_at_start": busy, "allowed_busy": busy > args.max_load,
            "workers": {k: w.info for k, w in workers.items()}}
  from smat import evaluate

  result["versions"] = evaluate.software_versions()
  s = result["summary"]
  lines = [report.provenance("benchmarks.cpu_side_by_side", argv,
                             _protocol(args, busy, started, s, result["allowed_busy"])), "",
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
