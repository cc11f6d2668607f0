"""Meta-training throughput: tasks/s, FLOPs per task and achieved FLOP/s of one method's step,
against a plain backbone forward+backward on the identical images.

  python -m benchmarks.throughput --config smat_glyphs --out F.json        # 2 CPU cores
  python -m benchmarks.throughput --config smat_vits16_md --random-backbone vit_s16 \
      --ways 10 --support 20 --query 100 --config.backbone.dtype=bfloat16 --out F.json   # GPU
  python -m benchmarks.throughput --config smat_glyphs --compile-episodes 200 \
      --config.data.sampler=md --config.data.max_ways=20 --config.data.max_support=100 --out F.json

Episodes are synthetic (random pixels, balanced labels) with the config's fixed-sampler shape
unless --ways/--support/--query say otherwise, so no dataset is needed. FLOPs come from XLA's
cost analysis of the compiled step (blocks unrolled); achieved FLOP/s = FLOPs per step ÷ step
time; `step_temp_gib` is the compiled step's temporary memory (XLA's buffer assignment).
`overhead_ratio` = achieved ÷ plain achieved FLOP/s: how close the method's step runs to the
backbone's own speed. `--breakdown` also times each part of an expert method's step alone
(router, gates and merge, inner step, student query pass, teachers, outer backward and update).
`--evaluation full,lora` also measures meta-test episodes/s, zero-shot and fine-tuned.
`--compile-episodes N` also streams N real variable-way episodes through the step and reports
how many times it compiled. `--compile-only` compiles the step from shapes and reports its FLOPs
and memory without running it, for configurations this machine could not hold. On a card whose
peak is known (`report.PEAK_BF16`), `mfu` is the step's achieved FLOP/s ÷ that peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from smat import config as config_lib
from smat import metatrain
from smat.data import loader
from smat.data.episodes import Episode
from smat.meta import step as meta_step
from smat.meta import methods, router, tasks
from smat.models import checkpoint, vit


def synthetic_episodes(tasks_: int, ways: int, support: int, query: int, size: int,
                       seed: int = 0) -> Episode:
  """A meta-batch of random-pixel episodes with balanced labels (every row valid)."""
  rng = np.random.default_rng(seed)
  labels = lambda n: np.tile(np.arange(n) % ways, (tasks_, 1)).astype(np.int32)
  images = lambda n: rng.integers(0, 256, (tasks_, n, size, size, 3), dtype=np.uint8)
  return Episode(images(support), labels(support), np.ones((tasks_, support), bool),
                 images(query), labels(query), np.ones((tasks_, query), bool),
                 np.ones((tasks_, ways), bool), np.zeros((tasks_,), np.int32))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", 0.0))


# The first calls of a step are slow while the process heap grows to its working size (with
# smat.host_memory's settings the second call of the SMAT glyph step still takes 2-3x the rest).
WARMUP_CALLS = 3


def seconds_per_call(fn, args, repeats: int) -> float:
  """Mean wall time of `fn(*args)` over `repeats` calls after `WARMUP_CALLS` untimed ones."""
  for _ in range(WARMUP_CALLS):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def _plain_loss(params, support, query, config):
  images = jnp.concatenate([support.reshape(-1, *support.shape[2:]),
                            query.reshape(-1, *query.shape[2:])])
  return jnp.mean(jnp.square(tasks.features(params, images, config)))


def temp_memory_gib(compiled) -> float | None:
  """GiB of temporaries XLA's buffer assignment gives the compiled step (on every backend, so
  CPU runs show what a change does to memory too)."""
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None)
  return None if temp is None else temp / 2 ** 30


def _peak_memory() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def abstract_setup(config, theta_pre, vit_config):
  """(state shapes, Hyper, optimizer) of `metatrain.setup` without allocating the M × |θ|
  state: what compiling a step needs."""
  parts = {}

  def initial_state(theta):
    _, parts["hp"], parts["optimizer"], state = metatrain.setup(config, (theta, vit_config))
    return state

  state = jax.eval_shape(initial_state, theta_pre)
  return state, parts["hp"], parts["optimizer"]


def _compile(config, ways: int, support: int, query: int, random_backbone: str | None,
             abstract: bool = False):
  """The compiled step and plain forward+backward on one synthetic meta-batch, their inputs and
  the method's Hyper. `abstract` builds the state from shapes only (no M × |θ| values), so a
  paper-scale step compiles on a machine that could not hold it."""
  theta_pre, vit_config = _backbone(config, random_backbone)
  if abstract:
    state, hp, optimizer = abstract_setup(config, theta_pre, vit_config)
  else:
    theta_pre, hp, optimizer, state = metatrain.setup(config, (theta_pre, vit_config))
  episodes = jax.device_put(synthetic_episodes(config.data.meta_batch_size, ways, support, query,
                                               config.data.image_size))
  rng = jax.random.key(2)
  lower = lambda hp_: meta_step.jit_step(hp_, optimizer).lower(state, episodes, rng, theta_pre)
  start = time.perf_counter()
  compiled = lower(hp).compile()
  compile_s = time.perf_counter() - start
  # XLA counts a loop's body once: the FLOPs of a chunked meta-batch are those of the same
  # update unchunked (model FLOPs, without the recomputed forward).
  counted = (lower(dataclasses.replace(hp, task_chunks=1)).compile() if hp.task_chunks > 1
             else compiled)
  plain = jax.jit(jax.grad(_plain_loss), static_argnums=3)
  plain_compiled = plain.lower(theta_pre, episodes.support_images, episodes.query_images,
                               vit_config).compile()
  return {"step": compiled, "counted": counted, "plain": plain_compiled, "state": state,
          "episodes": episodes, "rng": rng, "theta_pre": theta_pre, "hp": hp, "vit": vit_config,
          "compile_seconds": compile_s}


def _description(config, c: dict, ways: int, support: int, query: int,
                 random_backbone: str | None) -> dict:
  count = config.data.meta_batch_size
  step_memory = c["step"].memory_analysis()
  return {
      "method": c["hp"].method, "arch": random_backbone or config.backbone.path,
      "dtype": c["vit"].dtype, "remat": c["vit"].remat, "image_size": config.data.image_size,
      "tasks_per_step": count, "ways": ways, "support": support, "query": query,
      "num_experts": c["hp"].experts.num_experts, "task_chunks": c["hp"].task_chunks,
      "flops_per_task": _flops(c["counted"]) / count,
      "plain_flops_per_task": _flops(c["plain"]) / count,
      "compile_seconds": c["compile_seconds"], "step_temp_gib": temp_memory_gib(c["step"]),
      "step_argument_gib": getattr(step_memory, "argument_size_in_bytes", 0) / 2 ** 30,
      "plain_temp_gib": temp_memory_gib(c["plain"]),
  }


def compile_only(config, ways: int, support: int, query: int,
                 random_backbone: str | None) -> dict:
  """FLOPs and memory of the compiled step without running it: what a paper-scale configuration
  needs (arguments = θ_pre, state and episodes; temporaries from XLA's buffer assignment)."""
  c = _compile(config, ways, support, query, random_backbone, abstract=True)
  return _description(config, c, ways, support, query, random_backbone)


def measure(config, ways: int, support: int, query: int, repeats: int,
            random_backbone: str | None) -> dict:
  c = _compile(config, ways, support, query, random_backbone)
  result = _description(config, c, ways, support, query, random_backbone)
  holder = {"state": c["state"]}

  def run_step():
    holder["state"], metrics = c["step"](holder["state"], c["episodes"], c["rng"],
                                         c["theta_pre"])
    return metrics

  seconds = seconds_per_call(run_step, (), repeats)
  plain_seconds = seconds_per_call(c["plain"], (c["theta_pre"], c["episodes"].support_images,
                                                c["episodes"].query_images), repeats)
  count = config.data.meta_batch_size
  achieved = result["flops_per_task"] * count / seconds
  plain_achieved = result["plain_flops_per_task"] * count / plain_seconds
  peak = report.peak_flops(jax.devices()[0])
  return {
      **result, "step_seconds": seconds, "tasks_per_s": count / seconds,
      "achieved_flops_per_s": achieved, "plain_step_seconds": plain_seconds,
      "plain_achieved_flops_per_s": plain_achieved, "overhead_ratio": achieved / plain_achieved,
      "time_ratio": seconds / plain_seconds, "peak_memory_gib": _peak_memory(),
      # Model FLOP utilisation: achieved ÷ the card's dense bf16 peak, where the card is known.
      "mfu": achieved / peak if peak else None,
      "plain_mfu": plain_achieved / peak if peak else None,
  }


def breakdown(config, ways: int, support: int, query: int, repeats: int,
              random_backbone: str | None) -> dict:
  """Seconds per meta-batch of each part of an expert method's step, each jitted alone over
  the same synthetic tasks: router (θ_pre support pass, router), merge (gates sampled, masks
  merged, θ_task built), inner step (support forward + backward), student query pass, teachers
  (dense teacher step and pass, θ_pre query pass), the whole loss forward, and the step (loss
  forward, outer backward, optimiser). outer backward + update = step − loss forward."""
  theta_pre, vit_config = _backbone(config, random_backbone)
  theta_pre, hp, optimizer, state = metatrain.setup(config, (theta_pre, vit_config))
  if hp.method == "pmf":
    return {}
  episodes = jax.device_put(synthetic_episodes(config.data.meta_batch_size, ways, support,
                                               query, config.data.image_size))
  params, temp = state.params, hp.temperature(0)
  router_params = router.spectral_normalize(params["router"], state.router_state)
  keys = jax.random.split(jax.random.key(1), config.data.meta_batch_size)
  per_task = lambda fn: jax.jit(jax.vmap(fn))

  def routed(episode, key):
    return tasks.route(router_params, theta_pre, episode, hp, temp, key)[1]

  method = methods.get(hp)

  def merged(episode, key):
    return method.task_params(params, theta_pre, routed(episode, key), key, None)[0]

  def inner(episode, key):
    return tasks.inner_step(merged(episode, key), episode, hp)

  def student(episode, key):
    adapted, head, _, _ = inner(episode, key)
    return tasks.logits_of(tasks.features(adapted, episode.query_images, hp.vit), head,
                           episode.class_mask, hp)

  def teachers(episode, key):
    adapted, head, _, _ = inner(episode, key)
    f_q, vjp_q = jax.vjp(lambda t: tasks.features(t, episode.query_images, hp.vit), adapted)
    pre = tasks.features(theta_pre, episode.query_images, hp.vit)
    return tasks.dense_teacher(adapted, head, f_q, vjp_q, episode, hp), pre

  def loss(episode, key):
    return method.task_loss(params, theta_pre, router_params, episode, key, temp, None)[0]

  functions = (("router", routed), ("merge", merged), ("inner", inner), ("student", student),
               ("teachers", teachers), ("loss_forward", loss))
  cumulative = {name: seconds_per_call(per_task(fn), (episodes, keys), repeats)
                for name, fn in functions}
  step = meta_step.jit_step(hp, optimizer)
  holder = {"state": state}

  def run_step():
    holder["state"], metrics = step(holder["state"], episodes, jax.random.key(2), theta_pre)
    return metrics

  step_s = seconds_per_call(run_step, (), repeats)
  # Each function above includes the parts before it: the differences are the parts.
  parts = {"router": cumulative["router"],
           "gates_merge": cumulative["merge"] - cumulative["router"],
           "inner_step": cumulative["inner"] - cumulative["merge"],
           "student_query": cumulative["student"] - cumulative["inner"],
           "teachers": cumulative["teachers"] - cumulative["student"]}
  return {"seconds": parts, "loss_forward_seconds": cumulative["loss_forward"],
          "outer_backward_and_update_seconds": step_s - cumulative["loss_forward"],
          "step_seconds": step_s}


def evaluation(config, ways: int, support: int, query: int, repeats: int,
               random_backbone: str | None, modes=("full", "lora"), batch: int = 8) -> dict:
  """Meta-test episodes/s of the config's method on synthetic episodes: zero-shot (θ_task built
  per episode, `batch` episodes per call) and fine-tuned by each adapter of `modes` (one
  episode per call, `finetune.FinetuneConfig` defaults: 50 steps)."""
  from smat import finetune

  theta_pre, vit_config = _backbone(config, random_backbone)
  theta_pre, hp, _, state = metatrain.setup(config, (theta_pre, vit_config))
  temp = float(hp.temperature(0))
  episodes = jax.device_put(synthetic_episodes(batch, ways, support, query,
                                               config.data.image_size))
  zero_shot = jax.jit(meta_step.zero_shot_batch, static_argnames="hp")
  seconds = seconds_per_call(lambda: zero_shot(state.params, state.router_state, episodes,
                                               theta_pre, temp, hp=hp), (), repeats)
  result = {"zero_shot_episodes_per_s": batch / seconds}
  one = jax.tree.map(lambda x: x[:1], episodes)
  model = finetune.TaskModel(theta_pre, state.params, state.router_state, temp)
  keys, lrs = jax.random.key(0)[None], jnp.full((1,), 1e-4)
  for mode in modes:
    adapter, ft = finetune.ADAPTERS[mode], finetune.FinetuneConfig()
    run = lambda: finetune.finetune_batch(model, one, keys, lrs, adapter=adapter, hp=hp,
                                          config=vit_config, ft=ft)
    result[f"{mode}_episodes_per_s"] = 1.0 / seconds_per_call(run, (), max(repeats // 2, 1))
  return result


def _backbone(config, random_backbone: str | None):
  """(θ_pre, ViTConfig with blocks unrolled, so XLA's cost analysis counts every block)."""
  if random_backbone:
    vit_config = vit.get_config(random_backbone, dtype=config.backbone.dtype,
                                remat=config.backbone.remat)
    theta_pre = vit.init(vit_config, jax.random.key(0))
  else:
    theta_pre, vit_config = checkpoint.load_from_config(config.backbone)
  return theta_pre, vit_config.replace(unroll_blocks=True)


def compile_count(config, episodes: int) -> dict:
  """Compiles of the jitted step over `episodes` real episodes of the config's sampler."""
  theta_pre, hp, optimizer, state = metatrain.setup(config)
  source = loader.episode_source(config, "train")
  batch = config.data.meta_batch_size
  step = meta_step.jit_step(hp, optimizer)
  rng, ways, start = jax.random.key(0), [], time.perf_counter()
  for episodes_ in loader.batch_iterator(source, batch, episodes // batch,
                                         config.data.loader_threads):
    ways.extend(episodes_.class_mask.sum(-1).tolist())
    state, _ = step(state, episodes_, rng, theta_pre)
  jax.block_until_ready(state)
  return {"episodes": len(ways), "ways_min": int(min(ways)), "ways_max": int(max(ways)),
          "distinct_ways": len(set(ways)), "compiles": int(step._cache_size()),
          "buckets": source.buckets.count, "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--ways", type=int)
  parser.add_argument("--support", type=int, help="support images per task")
  parser.add_argument("--query", type=int, help="query images per task")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--random-backbone", metavar="ARCH",
                      help="random weights of this preset instead of config.backbone.path")
  parser.add_argument("--compile-episodes", type=int, default=0)
  parser.add_argument("--evaluation", default=None, metavar="MODE,...",
                      help="also meta-test episodes/s: zero-shot and fine-tuned by these "
                           "adapters (e.g. full,lora)")
  parser.add_argument("--compile-only", action="store_true",
                      help="FLOPs and memory of the compiled step, without running it (for "
                           "configurations past this machine's memory)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time each part of an expert method's step alone")
  args, overrides = report.parse_args(parser, argv)
  config = config_lib.load(args.config, overrides)
  d = config.data
  ways = args.ways or d.ways
  support, query = args.support or ways * d.shots, args.query or ways * d.queries
  if args.compile_only:
    result = compile_only(config, ways, support, query, args.random_backbone)
  else:
    result = measure(config, ways, support, query, args.repeats, args.random_backbone)
  result.update(device=str(jax.devices()[0].device_kind), devices=jax.device_count(),
                platform=platform.platform(), config=args.config, overrides=overrides,
                date=time.strftime("%Y-%m-%d"))
  if args.breakdown:
    result["breakdown"] = breakdown(config, ways, support, query, args.repeats,
                                    args.random_backbone)
  if args.evaluation:
    result["evaluation"] = evaluation(config, ways, support, query, args.repeats,
                                      args.random_backbone, tuple(args.evaluation.split(",")))
  if args.compile_episodes:
    result["compile_count"] = compile_count(config, args.compile_episodes)
    result["compiles"] = result["compile_count"]["compiles"]
  else:
    result["compiles"] = 1
  with open(args.out, "w") as f:
    json.dump(report.stamped(result), f, indent=1)
  keys = (("method", "flops_per_task", "plain_flops_per_task", "step_argument_gib",
           "step_temp_gib", "plain_temp_gib", "compile_seconds") if args.compile_only else
          ("method", "tasks_per_s", "flops_per_task", "achieved_flops_per_s",
           "plain_achieved_flops_per_s", "overhead_ratio", "time_ratio", "compiles"))
  print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
  fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
  print("| " + " | ".join(fmt(result[k]) for k in keys) + " |")


if __name__ == "__main__":
  main()
