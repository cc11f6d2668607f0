"""Scaling curves of the meta-training step: time per task against experts, ways, shots, image
size and backbone size, each varied alone from the config's values, next to a plain backbone
forward+backward on the same images.

  python -m benchmarks.scaling --config smat_glyphs --out F          # 2 CPU cores
  python -m benchmarks.scaling --config smat_vits16_md --archs vit_s16,vit_b16 \\
      --image-sizes 128,224 --ways 5,10,20,50 --config.backbone.dtype=bfloat16 --out F   # GPU

Every point is `benchmarks.throughput.measure` on synthetic episodes (fixed-sampler shapes:
support = ways × shots, query = ways × queries). The backbone axis uses random weights of each
preset; the other axes use the config's backbone (random weights of `--arch` when given). A
point that runs out of memory is recorded as such. Points are saved as they finish, so an
interrupted run resumes. Writes OUT.json, OUT.md (command, machine, date, commit) and
OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from benchmarks import report, throughput
from smat import config as config_lib
from smat import plots

AXES = ("experts", "ways", "shots", "image_size", "arch")


def point_config(config_path: str, overrides: list[str], axis: str, value):
  """The config of one point: the base config with `axis` set to `value`."""
  extra = {"experts": [f"--config.experts.num_experts={value}"],
           "image_size": [f"--config.data.image_size={value}"]}.get(axis, [])
  return config_lib.load(config_path, overrides + extra)


def measure_point(args, overrides: list[str], axis: str, value) -> dict:
  config = point_config(args.config, overrides, axis, value)
  d = config.data
  ways = int(value) if axis == "ways" else d.ways
  shots = int(value) if axis == "shots" else d.shots
  arch = value if axis == "arch" else args.arch
  try:
    result = throughput.measure(config, ways, ways * shots, ways * d.queries, args.repeats,
                                arch)
  except Exception as err:  # XLA reports exhausted memory as a runtime error
    if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
      raise
    return {"axis": axis, "value": value, "oom": True}
  return {"axis": axis, "value": value, "seconds_per_task": result["step_seconds"]
          / result["tasks_per_step"], "plain_seconds_per_task": result["plain_step_seconds"]
          / result["tasks_per_step"], **result}


def plot_scaling(points: list[dict], axes: list[str], path: str) -> None:
  """One panel per varied axis: seconds per task of the method's step and of the plain
  forward+backward (log scale). Each point has `axis`, `value`, `method`, `seconds_per_task`
  and `plain_seconds_per_task`; points that ran out of memory (`oom`) are left out."""
  plt, fig = plots.figure(3.2 * len(axes), 3.2)
  panels = fig.subplots(1, len(axes), squeeze=False)[0]
  for ax, axis in zip(panels, axes):
    done = [p for p in points if p["axis"] == axis and not p.get("oom")]
    labels = [str(p["value"]) for p in done]
    ax.plot(labels, [p["seconds_per_task"] for p in done], "o-",
            label=done[0]["method"] if done else "step")
    ax.plot(labels, [p["plain_seconds_per_task"] for p in done], "s--", label="plain fwd+bwd")
    ax.set_xlabel(axis.replace("_", " "))
    ax.set_ylabel("seconds per task")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--axes", default=",".join(AXES))
  parser.add_argument("--experts", default="1,2,4,8,16")
  parser.add_argument("--ways", default="5,10,20,50")
  parser.add_argument("--shots", default="1,5,10")
  parser.add_argument("--image-sizes", default="32,64")
  parser.add_argument("--archs", default="vit_mini_p4,vit_tiny_p4")
  parser.add_argument("--arch", default=None,
                      help="random weights of this preset for every axis but arch")
  parser.add_argument("--repeats", type=int, default=3)
  args, overrides = report.parse_args(parser, argv)
  values = {"experts": [int(v) for v in args.experts.split(",")],
            "ways": [int(v) for v in args.ways.split(",")],
            "shots": [int(v) for v in args.shots.split(",")],
            "image_size": [int(v) for v in args.image_sizes.split(",")],
            "arch": args.archs.split(",")}
  axes = args.axes.split(",")
  path = args.out + ".json"
  saved = json.load(open(path)) if os.path.exists(path) else {}
  points = saved.get("points", [])
  done = {(p["axis"], p["value"]) for p in points}
  device = jax.devices()[0].device_kind

  def write():
    with open(path, "w") as f:
      json.dump(report.stamped({"args": vars(args), "overrides": overrides, "device": device,
                                "points": points}), f, indent=1)
    lines = [report.provenance("benchmarks.scaling", argv), "",
             "| axis | value | s / task | plain s / task | step ÷ plain | GFLOP / task "
             "| overhead ratio | step temp GiB | peak GiB |", "|" + "---|" * 9]
    gib = lambda x: "—" if x is None else f"{x:.3f}"
    for p in points:
      if p.get("oom"):
        lines.append(f"| {p['axis']} | {p['value']} | out of memory | | | | | | |")
        continue
      lines.append(
          f"| {p['axis']} | {p['value']} | {p['seconds_per_task']:.4f} "
          f"| {p['plain_seconds_per_task']:.4f} | {p['time_ratio']:.2f} "
          f"| {p['flops_per_task'] / 1e9:.2f} | {p['overhead_ratio']:.2f} "
          f"| {gib(p.get('step_temp_gib'))} | {gib(p['peak_memory_gib'])} |")
    with open(args.out + ".md", "w") as f:
      f.write("\n".join(lines) + "\n")
    plot_scaling(points, axes, args.out + ".png")

  for axis in axes:
    if axis not in AXES:
      raise SystemExit(f"--axes: unknown axis {axis!r}; choose from {', '.join(AXES)}")
    for value in values[axis]:
      if (axis, value) in done:
        continue
      points.append(measure_point(args, overrides, axis, value))
      print(json.dumps({k: points[-1].get(k) for k in ("axis", "value", "seconds_per_task",
                                                       "overhead_ratio", "oom")}), flush=True)
      write()
  write()
  return 0


if __name__ == "__main__":
  sys.exit(main())
