"""Backbone forward / forward+backward throughput, FLOPs per image and peak memory.

  python -m benchmarks.backbone_throughput --arch vit_tiny_p4,vit_mini_p4 --out F.json
  python -m benchmarks.backbone_throughput --arch vit_s16,vit_b16 --image-size 128 \
      --batch 256 --dtype float32,bfloat16 --remat false,true --unroll false,true --out F.json  # GPU

FLOPs come from XLA's cost analysis of the program with the block loop unrolled (a rolled loop
body is counted once); achieved FLOP/s = FLOPs per image × images/s; MFU divides by the card's
dense bf16 peak where the card is known. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform

import jax
import jax.numpy as jnp

from benchmarks import report, throughput
from smat.models import vit

def _loss(params, images, config):
  return jnp.mean(jnp.square(vit.forward(params, images, config)))


def flops_per_image(config: vit.ViTConfig, image_size: int, backward: bool) -> float:
  """XLA's FLOP count for one image, from the program with every block unrolled."""
  config = config.replace(unroll_blocks=True)
  params = vit.param_shapes(config)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  fn = jax.grad(_loss) if backward else _loss
  cost = jax.jit(fn, static_argnums=2).lower(params, images, config).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def measure(arch: str, image_size: int, batch: int, dtype: str, remat: bool, unroll: bool,
            repeats: int) -> dict:
  config = vit.get_config(arch, dtype=dtype, remat=remat)
  config = config.replace(unroll_blocks=unroll)
  image_size = image_size or config.image_size
  params = vit.init(config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3))
  forward = jax.jit(vit.forward, static_argnums=2)
  train = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
  forward_s = throughput.seconds_per_call(forward, (params, images, config), repeats)
  train_s = throughput.seconds_per_call(train, (params, images, config), repeats)
  memory = train.lower(params, images, config).compile().memory_analysis()
  device = jax.devices()[0]
  fwd_flops = flops_per_image(config, image_size, backward=False)
  train_flops = flops_per_image(config, image_size, backward=True)
  row = {
      "arch": arch, "image_size": image_size, "batch": batch, "dtype": dtype, "remat": remat,
      "unrolled": unroll,
      "params": vit.count_params(params),
      "forward_gflops_per_image": fwd_flops / 1e9,
      "train_gflops_per_image": train_flops / 1e9,
      "forward_images_per_s": batch / forward_s,
      "train_images_per_s": batch / train_s,
      "train_achieved_tflops_per_s": train_flops * batch / train_s / 1e12,
      # Activations and other temporaries of one fwd+bwd step, from XLA's buffer assignment.
      "train_temp_memory_gib": memory.temp_size_in_bytes / 2**30 if memory else None,
  }
  peak = report.peak_flops(device)
  if peak:
    row["train_mfu_vs_bf16_peak"] = train_flops * batch / train_s / peak
  return row


def _bools(text: str) -> list[bool]:
  return [t.strip().lower() in ("1", "true", "yes") for t in text.split(",")]


def markdown(rows: list[dict]) -> str:
  head = ("| arch | px | batch | dtype | remat | unrolled | fwd GFLOP/img | fwd img/s | "
          "fwd+bwd img/s | TFLOP/s | MFU | step temp GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    mfu = f"{r['train_mfu_vs_bf16_peak']:.1%}" if "train_mfu_vs_bf16_peak" in r else "–"
    mem = f"{r['train_temp_memory_gib']:.2f}" if r["train_temp_memory_gib"] else "–"
    lines.append(f"| {r['arch']} | {r['image_size']} | {r['batch']} | {r['dtype']} | "
                 f"{r['remat']} | {r['unrolled']} | {r['forward_gflops_per_image']:.3f} | "
                 f"{r['forward_images_per_s']:.0f} | {r['train_images_per_s']:.0f} | "
                 f"{r['train_achieved_tflops_per_s']:.2f} | {mfu} | {mem} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", default="vit_tiny_p4,vit_mini_p4")
  parser.add_argument("--image-size", type=int, default=0, help="0: each preset's own")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="false")
  parser.add_argument("--unroll", default="true", help="unroll the loop over blocks")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = []
  grid = itertools.product(args.arch.split(","), args.dtype.split(","), _bools(args.remat),
                           _bools(args.unroll))
  for arch, dtype, remat, unroll in grid:
    rows.append(measure(arch, args.image_size, args.batch, dtype, remat, unroll, args.repeats))
    print(json.dumps(rows[-1]), flush=True)
  device = jax.devices()[0]
  result = {"device": f"{device.platform}: {getattr(device, 'device_kind', '')}",
            "device_count": jax.device_count(), "jax": jax.__version__,
            "host": platform.node(), "rows": rows}
  table = markdown(rows)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report.stamped({**result, "table": table}), f, indent=2)


if __name__ == "__main__":
  main()
