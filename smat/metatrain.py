"""Meta-training (SMAT, SoftMerge, PMF): `train_and_evaluate(config, workdir)`.

The loop around `smat.meta.step.meta_train_step`: episodes from the seeded stream, sharded over
a `Mesh` of all devices along the task axis; metrics fetched only at log steps; zero-shot
validation on fixed validation episodes after every epoch; orbax checkpoints of the trainable
state, optimiser state, router state, step, tasks seen, RNG and the episode stream position.

Resume order: (1) the latest checkpoint in `<workdir>/checkpoints`, (2) a fresh start (δ = 0,
log_α ~ N(0, 0.5²), λ = 0). θ_pre is read from `config.backbone` every time and never saved.
One orbax manager per run keeps the latest `train.keep_checkpoints` epochs and the epoch with the
best validation accuracy (the mean over sources), each written once (`run_manager`,
`find_checkpoint`); runs from before it keep their best in `<workdir>/best`, still read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from smat import fewshot, runs, sparsity, training
from smat.data import loader
from smat.errors import SmatError
from smat.meta import step as meta_step
from smat.data import augment
from smat.meta import experts, schedules, tasks
from smat.models import checkpoint, vit

EXPERT_METHODS = ("smat", "softmerge")


def mask_strategy(config):
  """The `smat.sparsity` strategy of `experts.masks` (None for SMAT's learned gates), at density
  1 − τ, its schedule in steps from the fractions in `config.sparsity`."""
  e, sp = config.experts, config.sparsity
  if e.masks == "learned" or config.method != "smat":
    return None
  _, total = schedule_steps(config)
  fields = {"density": 1.0 - e.target_sparsity,
            "exclude": experts.EMBEDDINGS if e.freeze_embeddings else ()}
  if e.masks in ("map", "influence", "selfpruner"):
    fields["start"] = int(round(sp.start * total))
  if e.masks in ("map", "influence"):
    fields["end"] = int(round(sp.end * total))
  if e.masks == "selfpruner" and sp.rates:
    fields["rates"] = tuple(float(r) for r in sp.rates.split(","))
  if e.masks == "map":
    fields.update(every=sp.every, normalize=sp.normalize)
  if e.masks == "circuit":
    fields.update(every=sp.every, group_size=sp.group_size, node_weighted=sp.node_weighted)
  if e.masks == "influence":
    fields.update(window=sp.window, beta1=sp.beta1, beta2=sp.beta2)
  if e.structured:
    raise SmatError("experts.structured applies to learned gates; mask strategies are "
                    "unstructured: set experts.structured=False or experts.masks=learned")
  try:
    return sparsity.make(e.masks, **fields)
  except ValueError as err:
    raise SmatError(f"experts.masks={e.masks!r}: {err}") from None


def hyper(config, vit_config, devices: int = 1) -> tasks.Hyper:
  """The static hyper-parameters of the task loss from a config, for a step over `devices`."""
  e, t, r = config.experts, config.teacher, config.router
  return tasks.Hyper.of(
      method=config.method, vit=vit_config, num_experts=e.num_experts,
      target_sparsity=e.target_sparsity, gate_noise=e.gate_noise, inner_lr=config.inner.lr,
      teacher_lr=t.lr, kd_temperature=t.temperature, kd_direction=t.direction,
      ce_weight=1.0 - t.weight, kd_weight=t.weight, router_logit_weight=r.logit_weight,
      temperature_start=r.temperature_start, temperature_floor=r.temperature_floor,
      temperature_decay_tasks=r.temperature_decay_tasks, mask_strategy=mask_strategy(config),
      structured=e.structured, freeze_embeddings=e.freeze_embeddings,
      task_chunks=task_chunks(config, devices), augment=augment_config(config))


def augment_config(config) -> augment.AugmentConfig | None:
  """The meta-training augmentation of `config.augment` (None when it is off)."""
  a = config.augment
  if not a.enabled:
    return None
  return augment.AugmentConfig(crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
                               brightness=a.brightness, contrast=a.contrast,
                               saturation=a.saturation, flip_prob=a.flip_prob)


def task_chunks(config, devices: int = 1) -> int:
  """How many sequential chunks each device's share of the meta-batch runs in, so that it runs
  `train.tasks_at_once` tasks at a time (0: its whole share at once)."""
  share = config.data.meta_batch_size // devices
  at_once = config.train.tasks_at_once or share
  if at_once < 0 or share % at_once:
    raise SmatError(
        f"config field train.tasks_at_once={config.train.tasks_at_once}: each of the {devices} "
        f"device(s) runs {share} of data.meta_batch_size={config.data.meta_batch_size} tasks, "
        f"which do not split into chunks of {at_once}; pick a divisor of {share} (0 runs them "
        "all at once)")
  return share // at_once


def schedule_steps(config) -> tuple[int, int]:
  """(steps per epoch, total steps)."""
  per_epoch = max(config.train.episodes_per_epoch // config.data.meta_batch_size, 1)
  return per_epoch, per_epoch * config.train.epochs


_zero_shot = jax.jit(meta_step.zero_shot_batch, static_argnames="hp")  # one per (hp, shape)


@dataclasses.dataclass
class Run:
  """What a trained run needs to predict: method, θ_pre, trainable params, router state."""

  hp: tasks.Hyper
  theta_pre: dict
  params: dict
  router_state: dict
  tasks_seen: int

  @property
  def temperature(self) -> float:
    return float(self.hp.temperature(self.tasks_seen))

  def zero_shot_accuracy(self, episodes) -> tuple[np.ndarray, np.ndarray | None]:
    """Query accuracies [T] (and α [T, M]) of a stacked batch of episodes."""
    acc, alpha = _zero_shot(self.params, self.router_state, episodes, self.theta_pre,
                            self.temperature, hp=self.hp)
    return np.asarray(acc), None if alpha is None else np.asarray(alpha)

  def sparsity(self) -> dict[str, list[float]] | None:
    """Each expert's sparsity: `deployed` (the deterministic masks meta-test uses, which τ
    constrains), and for learned gates `sampled` (one draw of the training gates with the run's
    noise) and `expected` (1 − E[L0]); None for methods without masks."""
    params = self.params
    if "masks" in params:
      return {"deployed": np.asarray(experts.sparsity(params["masks"], self.theta_pre)).tolist()}
    if "gates" not in params:
      return None
    sampled = experts.sample_masks(jax.random.key(0), params["gates"], self.hp.experts.gate_noise)
    return {"deployed": np.asarray(experts.deployed_sparsity(params["gates"],
                                                             self.theta_pre)).tolist(),
            "sampled": np.asarray(experts.sparsity(sampled, self.theta_pre)).tolist(),
            "expected": (1.0 - np.asarray(experts.expected_l0(params["gates"],
                                                              self.theta_pre))).tolist()}

  def dense_params(self) -> dict:
    """θ_pre + δ (PMF only: the one backbone every task shares)."""
    if self.hp.method != "pmf":
      raise SmatError(f"{self.hp.method} builds one backbone per task; use zero_shot_accuracy")
    return jax.tree.map(lambda p, d: p + d, self.theta_pre, self.params["delta"])


def evaluate(run: Run, batches, progress: str | None = None) -> dict:
  """Zero-shot accuracy (%) with 95% CI and mean α over stacked episode batches; over
  {source: batches}, each source's result and their mean (`combine_sources`)."""
  from tqdm.auto import tqdm

  if isinstance(batches, dict):
    return combine_sources({name: evaluate(run, b, progress) for name, b in batches.items()})
  start, accuracies, alphas = time.perf_counter(), [], []
  for batch in tqdm(batches, desc=progress, leave=False, disable=progress is None, unit="batch"):
    acc, alpha = run.zero_shot_accuracy(batch)
    accuracies.append(acc)
    if alpha is not None:
      alphas.append(alpha)
  result = fewshot.accuracy_summary(accuracies, time.perf_counter() - start)
  if alphas:
    result["alpha_mean"] = np.concatenate(alphas).mean(0).tolist()
  return result


def combine_sources(per_source: dict[str, dict]) -> dict:
  """One validation result from per-source ones, with `per_source` accuracies added.

  accuracy = the mean of the per-source accuracies, so every source counts alike whatever its
  episodes (the authors' checkpoint selection); ci95 = that of a mean of independent means. One
  source's result is kept as it is.
  """
  results = list(per_source.values())
  if len(results) == 1:
    combined = dict(results[0])
  else:
    episodes = [r["episodes"] for r in results]
    combined = {
        "accuracy": float(np.mean([r["accuracy"] for r in results])),
        "ci95": float(np.sqrt(sum(r["ci95"] ** 2 for r in results)) / len(results)),
        "episodes": int(sum(episodes)),
        "episodes_per_s": sum(episodes) / sum(n / r["episodes_per_s"]
                                              for n, r in zip(episodes, results)),
        "per_episode": [a for r in results for a in r["per_episode"]]}
    if all("alpha_mean" in r for r in results):  # per episode, as over one stream
      combined["alpha_mean"] = (np.average([r["alpha_mean"] for r in results], axis=0,
                                           weights=episodes).tolist())
  combined["per_source"] = {name: {k: r[k] for k in ("accuracy", "ci95", "episodes")}
                            for name, r in per_source.items()}
  return combined


def _save(manager, state: meta_step.MetaState, rng, data_state: dict, metrics=None) -> None:
  import orbax.checkpoint as ocp

  items = {"state": ocp.args.StandardSave({**_fields(state), "rng": jax.random.key_data(rng)}),
           "data": ocp.args.JsonSave(data_state)}
  manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(manager, state: meta_step.MetaState, rng, step: int | None = None):
  """(state, rng, data-stream state or None) from `step` (default latest) of `manager`."""
  import orbax.checkpoint as ocp

  step = manager.latest_step() if step is None else step
  if step is None:
    return state, rng, None
  target = {**_fields(state), "rng": jax.random.key_data(rng)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  fields = dict(restored["state"])
  rng = jax.random.wrap_key_data(fields.pop("rng"))
  if "sparsity" in fields:
    fields["mask_state"] = fields.pop("sparsity")
  return meta_step.MetaState(**fields), rng, restored["data"]


def _fields(state: meta_step.MetaState) -> dict:
  """The checkpointed fields: the mask strategy's state under its checkpoint name "sparsity",
  left out when empty (runs without a mask strategy keep the layout they always had)."""
  fields = state._asdict()
  mask_state = fields.pop("mask_state")
  if jax.tree.leaves(mask_state):
    fields["sparsity"] = mask_state
  return fields


def setup(config, backbone: tuple[dict, vit.ViTConfig] | None = None, devices: int = 1):
  """θ_pre, Hyper, optimiser and the initial state of a config (images of another size than
  the backbone's run with resampled position embeddings), for a step over `devices`.

  `backbone` = (θ_pre, ViTConfig) replaces the one `config.backbone` names.
  """
  theta_pre, vit_config = backbone or checkpoint.load_from_config(config.backbone)
  hp = hyper(config, vit_config, devices)
  if config.optim.schedule not in schedules.SCHEDULES:
    raise SmatError(f"config field optim.schedule={config.optim.schedule!r}: use one of "
                    f"{', '.join(schedules.SCHEDULES)}")
  per_epoch, total = schedule_steps(config)
  optimizer = meta_step.make_optimizer(config.optim, per_epoch, total,
                                       masks=hp.experts.mask_strategy is not None)
  params, router_state, mask_state = meta_step.init(jax.random.key(config.seed), theta_pre, hp)
  state = meta_step.init_state(params, router_state, optimizer, mask_state)
  return theta_pre, hp, optimizer, state


BEST_METRIC = "val_accuracy"  # what the run's manager keeps its best step by


def run_manager(workdir: str, keep: int = 1):
  """The run's one checkpoint manager, `<workdir>/checkpoints`: the latest `keep` epochs and
  the best-validating one (saved with its validation accuracy as metrics)."""
  return training.checkpoint_manager(os.path.join(workdir, "checkpoints"), keep, BEST_METRIC)


def find_checkpoint(workdir: str, which: str = "best"):
  """(manager, step, where) of the checkpoint `which` names: "best" (the best-validating
  epoch, what meta-test uses) or "checkpoints" (the latest). Runs written before one manager
  kept both hold their best in `<workdir>/best`, which is read too (its step counted only when
  not newer than the latest checkpoint, a future that a resume redid)."""
  manager = run_manager(workdir)
  latest = manager.latest_step()
  if which == "checkpoints":
    if latest is None:
      raise SmatError(f"{workdir}/checkpoints: no checkpoint yet; train with `smat meta-train`")
    return manager, latest, f"{workdir}/checkpoints/{latest}"
  candidates = []
  if (step := manager.best_step()) is not None:
    candidates.append((manager.metrics(step)[BEST_METRIC], step, manager, "checkpoints"))
  if os.path.isdir(os.path.join(workdir, "best")):
    legacy = training.checkpoint_manager(os.path.join(workdir, "best"), 1, BEST_METRIC)
    step = legacy.best_step()
    if step is not None and (latest is None or step <= latest):
      candidates.append((legacy.metrics(step)[BEST_METRIC], step, legacy, "best"))
  if not candidates:
    raise SmatError(f"{workdir}: no validated checkpoint yet; train with `smat meta-train`")
  _, step, found, folder = max(candidates, key=lambda c: c[:2])
  return found, step, f"{workdir}/{folder}/{step}"


def load_run(workdir: str, which: str = "best") -> Run:
  """A trained run from `<workdir>/config.json` and its best (or latest: "checkpoints")
  checkpoint (`find_checkpoint`)."""
  from smat import config as config_lib

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise SmatError(f"{workdir}: no config.json; is it a `smat meta-train` workdir?")
  config = config_lib.from_json(path)
  theta_pre, hp, optimizer, state = setup(config)
  manager, step, where = find_checkpoint(workdir, which)
  state, _, _ = runs.readable(lambda: restore(manager, state, jax.random.key(0), step), where)
  runs.check_finite_params(state.params, where)
  return Run(hp, theta_pre, state.params, state.router_state, int(state.tasks_seen))


def _host_metrics(metrics: dict, state) -> dict:
  out = training.to_host(metrics)
  out["tasks_seen"] = int(state.tasks_seen)
  for name in ("expert_sparsity", "sampled_sparsity", "expected_sparsity"):
    if name in out:  # expert_sparsity: the deterministic (meta-test) masks, which τ constrains
      out[f"mean_{name}"] = float(np.mean(out[name]))
  return out


def validation_sources(config, count: int | None = None) -> dict[str, list]:
  """{source: its fixed validation episodes (first `val.episodes` of its val split), in
  batches}, for each domain of `data.val`."""
  from smat.data.spec import load_domains

  domains = load_domains(config.data.val, config.data_dir or None, seed=config.seed)
  return {d.name: loader.fixed_episodes(loader.episode_source(config, "val", domains=[d]),
                                        count or config.val.episodes, config.val.batch_size,
                                        num_threads=config.data.loader_threads)
          for d in domains}


def validation_batches(config, count: int | None = None):
  """Every source's fixed validation episodes in one list of batches, source after source."""
  return [b for batches in validation_sources(config, count).values() for b in batches]


def train_and_evaluate(config, workdir: str, stop_after: int | None = None,
                       progress: bool = True) -> dict:
  """Meta-train (or resume) to the configured length; validate each epoch; keep the best.

  `stop_after` ends this invocation after that many total steps (as a crash would); calling
  again with the same config resumes exactly. The config is checked and the workdir locked first
  (`smat.runs`).
  """
  runs.check_config(config)
  runs.prepare_workdir(workdir)
  runs.quiet_orbax_errors()
  with runs.WorkdirLock(workdir, training.is_primary()):
    return _train_and_evaluate(config, workdir, stop_after, progress)


def describe_checkpoint(workdir: str, run: Run, which: str = "best") -> dict:
  """Which model a figure describes: its step, epoch, validation accuracy and per-expert
  sparsity (`Run.sparsity`), read from the run's config and validation history."""
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  step = run.tasks_seen // config["data"]["meta_batch_size"]
  entry = {h["step"]: h for h in _read_history(workdir, step)}.get(step, {})
  return {"checkpoint": which, "step": step, "epoch": entry.get("epoch"),
          "val_accuracy": entry.get("accuracy"), "sparsity": run.sparsity()}


def _train_and_evaluate(config, workdir: str, stop_after: int | None, progress: bool) -> dict:
  saved = config.copy_and_resolve_references()
  if saved.backbone.path and os.path.exists(saved.backbone.path):  # usable from any directory
    saved.backbone.path = os.path.abspath(saved.backbone.path)
  if training.is_primary():
    runs.record_config(workdir, saved.to_json_best_effort(indent=1))
  mesh = training.data_mesh()
  batch_size = config.data.meta_batch_size
  training.check_divisible(batch_size, "data.meta_batch_size", mesh)
  theta_pre, hp, optimizer, state = setup(config, devices=mesh.size)
  per_epoch, total = schedule_steps(config)
  lrs = schedules.group_schedules(config.optim, per_epoch, total)
  replicated, sharded = training.shardings(mesh)
  step_fn = meta_step.jit_step(hp, optimizer, replicated)
  theta_pre = training.replicate(theta_pre, replicated)
  state = training.replicate(state, replicated)

  manager = run_manager(workdir, config.train.keep_checkpoints)
  key = jax.random.key(config.seed + 1)
  state, rng, data_state = runs.restore_intact(
      manager, lambda step: restore(manager, state, key, step), workdir,
      training.is_primary()) or (state, key, None)
  rng = training.replicate(rng, replicated)  # fresh and restored runs share one compiled step
  start = int(state.step)
  end = total if stop_after is None else min(stop_after, total)
  source = loader.episode_source(config, "train")
  batches = loader.batch_iterator(source, batch_size, total, config.data.loader_threads,
                                  config.data.prefetch, jax.process_index(), jax.process_count(),
                                  state=data_state)
  val = validation_sources(config)
  guard = runs.DivergenceGuard(config, manager, workdir)
  history = _read_history(workdir, start)
  epoch_end = lambda done: done % per_epoch == 0 or done == total

  def scalars(metrics, state, done):
    scalars = _host_metrics(metrics, state)
    _check_finite(state, manager, workdir)
    guard.check(scalars, state.params, done)
    runs.check_saves(manager)
    return {**scalars, **{f"{g}_lr": float(lr(done - 1) if callable(lr) else lr)
                          for g, lr in lrs.items() if g in state.params}}

  def checkpoint(state, done, write):
    """Validate and save the epoch's checkpoint, with its validation accuracy as the metric the
    best is kept by unless the divergence guard refuses it."""
    run = Run(hp, theta_pre, state.params, state.router_state, int(state.tasks_seen))
    result = evaluate(run, val)
    history.append({"step": done, "epoch": done // per_epoch, **result})
    write(done, {"val_accuracy": result["accuracy"], "val_ci95": result["ci95"]})
    metrics = {BEST_METRIC: result["accuracy"]} if guard.promote(result, done) else None
    runs.save(_save, manager, state, rng, batches.get_state(), metrics)
    if training.is_primary():
      _write_history(workdir, history)

  hooks = training.Hooks(
      step=lambda state, batch: step_fn(state, training.from_local(batch, sharded), rng,
                                        theta_pre),
      scalars=scalars, log_at=lambda done: done % config.train.log_every == 0 or epoch_end(done),
      checkpoint_at=epoch_end, checkpoint=checkpoint, postfix=_postfix,
      rate=("tasks_per_s", batch_size),
      finish=lambda: runs.finish_saves(manager))
  train_start = time.perf_counter()
  state = training.train_loop(state, batches, start, end, total, hooks, workdir,
                              f"meta-train {hp.method}", progress)
  summary = {"method": hp.method, "stopped_at": int(state.step), "total_steps": total,
             "tasks_seen": int(state.tasks_seen), "validation": history,
             "train_seconds": time.perf_counter() - train_start}
  if history:
    best = max(reversed(history), key=lambda h: h["accuracy"])  # ties: the latest, as kept
    summary["best"] = {"step": best["step"], "val_accuracy": best["accuracy"],
                       "val_ci95": best["ci95"]}
  return summary


def _postfix(scalars: dict) -> dict:
  shown = {"loss": f"{scalars['loss']:.3f}", "acc": f"{scalars['query_accuracy']:.3f}"}
  if "mean_expert_sparsity" in scalars:
    shown["sparsity"] = f"{scalars['mean_expert_sparsity']:.3f}"
  if "alpha" in scalars:
    shown["T"] = f"{scalars['temperature']:.2f}"
  return shown


def _check_finite(state: meta_step.MetaState, manager, workdir: str) -> None:
  bad = int(state.bad_step)
  if bad >= 0:
    good = manager.latest_step()
    where = (f"the last good checkpoint is step {good} in {workdir}/checkpoints" if good
             is not None else "no checkpoint was written yet")
    raise SmatError(f"non-finite loss or gradient at step {bad + 1}; training stopped and {where}. "
                    f"Lower optim.delta_lr / optim.gate_lr or raise optim.warmup_epochs and run "
                    f"again.")


def _history_path(workdir: str) -> str:
  return os.path.join(workdir, "validation.json")


def _read_history(workdir: str, upto_step: int) -> list:
  if not os.path.exists(_history_path(workdir)):
    return []
  with open(_history_path(workdir)) as f:
    return [h for h in json.load(f) if h["step"] <= upto_step]


def _write_history(workdir: str, history: list) -> None:
  tmp = _history_path(workdir) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(history, f, indent=1)
  os.replace(tmp, _history_path(workdir))
