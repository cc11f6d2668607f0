"""What every trainer shares: the metrics log, orbax checkpoint managers, device placement."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from smat.errors import SmatError


class MetricsLog:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tensorboard`)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """Rows past `resume_step` (logged after the checkpoint a resumed run starts from) are
    dropped, so the file reads like one uninterrupted run. Only the first process of a
    multi-host run writes (every process holds the same replicated metrics)."""
    from tensorboardX import SummaryWriter

    self.enabled = is_primary()
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= resume_step]
      with open(path, "w") as f:
        f.writelines(kept)
    self.jsonl = open(path, "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    """One JSON row; vectors (per-expert values) go to TensorBoard as `name/k` scalars."""
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      if isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
          self.tb.add_scalar(f"{name}/{k}", v, step)
      elif isinstance(value, (int, float)):
        self.tb.add_scalar(name, value, step)

  def close(self):
    if not self.enabled:
      return
    self.jsonl.close()
    self.tb.close()


def is_primary() -> bool:
  """Whether this process writes the run's files (the first of a multi-host run)."""
  return jax.process_index() == 0


def to_host(metrics: dict) -> dict:
  """Device metrics → floats, and lists of floats for vectors."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v, np.float64)
    out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
  return out


def checkpoint_manager(directory: str, keep: int, best_metric: str | None = None):
  """Orbax manager in `directory` keeping the latest `keep` steps and, with `best_metric`, also
  the best step by that metric (saved with `metrics={best_metric: value}`; a step saved without
  metrics is never the best), which `manager.best_step()` names: one manager per run, each
  epoch's state written once. Ties go to the latest step.

  Multi-host barriers are prefixed with the directory's name, so that two managers saving at
  the same step (a run's and a legacy `best/`, or two runs in one process) do not collide
  across processes ("barrier ... is already ongoing")."""
  import orbax.checkpoint as ocp
  from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

  policy = policies.LatestN(keep)
  if best_metric:
    policy = policies.AnyPreservationPolicy([policy, policies.BestN(
        get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=policy,
      best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode="max",
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=os.path.basename(os.path.normpath(directory))))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def data_mesh() -> Mesh:
  """One axis, "data", over every device of every process."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, split along the leading axis over "data")."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def check_divisible(count: int, field: str, mesh: Mesh) -> None:
  if count % mesh.size:
    raise SmatError(f"config field {field}={count} is not divisible by the {mesh.size} devices; "
                    f"pick a multiple of {mesh.size}")


def replicate(tree, sharding: NamedSharding):
  """Every leaf as one global array replicated over `sharding`'s devices. With several
  processes each passes the same values (a fixed seed, or a restored checkpoint); PRNG keys
  travel as their key data."""
  def put(x):
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, tree)


def from_local(tree, sharding: NamedSharding):
  """Global arrays from this process's part of a batch (leading axis: its share of it)."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def local_slice(tree, sharding: NamedSharding, global_size: int):
  """Global arrays from this process's slice of a whole host batch (leading axis = global
  batch, as every process loads it)."""
  local = global_size // jax.process_count()
  first = jax.process_index() * local
  return from_local(jax.tree.map(lambda x: np.asarray(x)[first:first + local], tree), sharding)


class Hooks(NamedTuple):
  """What a trainer gives `train_loop`: its step and what it does around it."""

  step: Callable  # (state, host batch) -> (state, device metrics)
  scalars: Callable  # (device metrics, state, step done) -> host scalars; raises on non-finite
  log_at: Callable  # step done -> whether to log (the loop also logs the last step)
  checkpoint_at: Callable  # step done -> whether to checkpoint
  checkpoint: Callable  # (state, step done, write) validates/saves; write(step, scalars) logs
  postfix: Callable  # scalars -> the progress bar's postfix
  rate: tuple  # (name, items per step) of the logged throughput, e.g. ("tasks_per_s", 16)
  finish: Callable = lambda: None  # on every exit, crash included (wait for saves)


def train_loop(state, batches, start: int, end: int, total: int, hooks: Hooks, workdir: str,
               desc: str, progress: bool = True):
  """Steps `start … end - 1` over `batches`; logs to `<workdir>/metrics.jsonl` and
  TensorBoard, shows progress and checkpoints as the hooks say. Returns the last state.

  One loop for every trainer (pre-training, meta-training), so that logging, throughput,
  progress and the order of checks → log → checkpoint are the same for all of them.
  """
  from tqdm.auto import tqdm

  log = MetricsLog(workdir, resume_step=start)
  bar = tqdm(total=total, initial=start, desc=desc, unit="step",
             disable=not progress or not is_primary())
  rate_name, per_step = hooks.rate
  last_time, last_step = time.perf_counter(), start
  try:
    for step, batch in zip(range(start, end), batches):
      state, metrics = hooks.step(state, batch)
      done = step + 1
      if hooks.log_at(done) or done == end:
        scalars = hooks.scalars(metrics, state, done)
        now = time.perf_counter()
        scalars[rate_name] = (done - last_step) * per_step / max(now - last_time, 1e-9)
        last_time, last_step = now, done
        log.write(done, scalars)
        bar.set_postfix(hooks.postfix(scalars))
      if hooks.checkpoint_at(done):
        hooks.checkpoint(state, done, log.write)
        last_time = time.perf_counter()  # throughput leaves validation and saving out
      bar.update(1)
  finally:
    bar.close()
    log.close()
    hooks.finish()
  return state
