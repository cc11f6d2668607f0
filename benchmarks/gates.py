"""The gate path of a SMAT step alone, two ways: per task, sample M hard-concrete gate tensors the
size of the backbone, merge them with the router's α, build θ_task = θ_pre + m ⊙ δ, and take the
gradient of the meta-batch mean through all of it (to log α, α and δ).

  sampled  z = gates.sample(...) as arrays, merged, then autodiff (z and its intermediates stay
           in memory for the backward pass)
  fused    experts.sample_merged, what the step uses: z is merged as it is drawn and redrawn
           from the same key in the backward pass, so no M × |θ| tensor is kept

  python -m benchmarks.gates --archs vit_mini_p4 --out F                    # 2 CPU cores
  python -m benchmarks.gates --archs vit_s16,vit_b16 --experts 4,8,16 --out F   # GPU

The backbone only gives the parameter tree (random values); the loss is a fixed linear read-out
of θ_task, so the time is the gates' own. Per (arch, M, implementation): milliseconds per
meta-batch, the compiled gradient's temporary memory (XLA's buffer assignment), and the largest
difference between the two implementations' gradients. A point that runs out of memory is
recorded as such; `--memory-only` compiles without running, for trees past the machine's
memory. Writes OUT.json and OUT.md (command, machine, date, commit).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks import report, throughput
from smat.meta import experts, gates
from smat.models import vit

IMPLEMENTATIONS = ("sampled", "fused")


def merged_masks(implementation: str, key, gate_logits, alpha, params, noise: float):
  """(m per leaf, each expert's sparsity [M]) by either implementation."""
  if implementation == "fused":
    return experts.sample_merged(key, gate_logits, alpha, params, noise)
  masks = experts.sample_masks(key, gate_logits, noise)
  return experts.merge(alpha, masks), experts.sparsity(masks, params)


def gradient_fn(implementation: str, theta_pre, readout, noise: float):
  """jit of (log α, δ, α [T, M], keys [T]) → gradients of the meta-batch mean read-out."""
  def task_loss(gate_logits, delta, alpha, key):
    merged, sparsity = merged_masks(implementation, key, gate_logits, alpha, theta_pre, noise)
    theta = experts.interpolate(theta_pre, delta, merged)
    read = sum(jnp.vdot(t, r) for t, r in zip(jax.tree.leaves(theta), jax.tree.leaves(readout)))
    return read + jax.lax.stop_gradient(sparsity).sum()

  def loss(gate_logits, delta, alpha, keys):
    return jax.vmap(task_loss, (None, None, 0, 0))(gate_logits, delta, alpha, keys).mean()

  return jax.jit(jax.grad(loss, (0, 1, 2)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def inputs(arch: str, experts_: int, tasks: int):
  """(θ_pre, read-out, log α, δ, α, keys) with random values in the tree of `arch`."""
  theta_pre = vit.init(vit.get_config(arch), jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 4))
  random_like = lambda key, scale: jax.tree.map(
      lambda p: scale * jax.random.normal(key, p.shape), theta_pre)
  readout, delta = random_like(next(keys), 1.0), random_like(next(keys), 0.01)
  gate_logits = experts.init_gates(next(keys), theta_pre, experts_)
  alpha = jax.nn.softmax(jax.random.normal(next(keys), (tasks, experts_)))
  return theta_pre, readout, gate_logits, delta, alpha, jax.random.split(jax.random.key(2), tasks)


def measure(arch: str, experts_: int, tasks: int, repeats: int, noise: float,
            memory_only: bool = False) -> list[dict]:
  theta_pre, readout, gate_logits, delta, alpha, keys = inputs(arch, experts_, tasks)
  args = (gate_logits, delta, alpha, keys)
  size = experts.total_size(theta_pre)
  points, grads = [], {}
  for implementation in IMPLEMENTATIONS:
    point = {"arch": arch, "experts": experts_, "tasks": tasks, "parameters": size,
             "implementation": implementation}
    try:
      compiled = gradient_fn(implementation, theta_pre, readout, noise).lower(*args).compile()
      if not memory_only:
        seconds = throughput.seconds_per_call(compiled, args, repeats)
        grads[implementation] = compiled(*args)
    except Exception as err:  # XLA reports exhausted memory as a runtime error
      if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
        raise
      points.append({**point, "oom": True})
      continue
    points.append({**point, "ms": None if memory_only else 1e3 * seconds,
                   "temp_gib": throughput.temp_memory_gib(compiled)})
  if len(grads) == 2:
    a, b = (jax.tree.leaves(grads[i]) for i in IMPLEMENTATIONS)
    scale = max(float(jnp.abs(x).max()) for x in a if x.size)
    diff = max(float(jnp.abs(x - y).max()) for x, y in zip(a, b) if x.size)
    for point in points:
      point["max_gradient_difference"] = diff / scale  # relative to the largest gradient
  return points


def markdown(points: list[dict], argv: list[str]) -> str:
  lines = [report.provenance("benchmarks.gates", argv), "",
           "| arch | M | tasks | implementation | ms / meta-batch | temp GiB | fused ÷ sampled "
           "time | gradient difference |", "|" + "---|" * 8]
  sampled = {(p["arch"], p["experts"]): p for p in points if p["implementation"] == "sampled"}
  for p in points:
    head = f"| {p['arch']} | {p['experts']} | {p['tasks']} | {p['implementation']} "
    if p.get("oom"):
      lines.append(head + "| out of memory | | | |")
      continue
    ref = sampled.get((p["arch"], p["experts"]), {})
    ratio = f"{p['ms'] / ref['ms']:.2f}" if p["ms"] and ref.get("ms") else ""
    ms = "not run" if p["ms"] is None else f"{p['ms']:.1f}"
    temp = "—" if p["temp_gib"] is None else f"{p['temp_gib']:.3f}"
    diff = p.get("max_gradient_difference")
    lines.append(head + f"| {ms} | {temp} | {ratio} | "
                 f"{'' if diff is None else f'{diff:.1e}'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archs", default="vit_mini_p4")
  parser.add_argument("--experts", default="1,2,4,8,16")
  parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--noise", type=float, default=gates.FULL_NOISE,
                      help="half width of the gates' uniform noise around 0.5")
  parser.add_argument("--memory-only", action="store_true",
                      help="compile and report memory without running (sizes past this RAM)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  device = jax.devices()[0].device_kind
  points = []
  for arch in args.archs.split(","):
    for m in (int(v) for v in args.experts.split(",")):
      points.extend(measure(arch, m, args.tasks, args.repeats, args.noise, args.memory_only))
      print(json.dumps(points[-2:]), flush=True)
      with open(args.out + ".json", "w") as f:
        json.dump(report.stamped({"args": vars(args), "device": device, "points": points}), f,
                  indent=1)
      with open(args.out + ".md", "w") as f:
        f.write(markdown(points, argv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
