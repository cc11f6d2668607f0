"""A meta-training workdir's guards: nothing lost, nothing silent.

  check_config    every count and name of a config up front (one line, not a traceback)
  prepare_workdir a workdir that is a file or read-only fails before any work
  WorkdirLock     one process per workdir: a second `meta-train` names the holder
  record_config   a resume keeps the run's config.json; changed values are an error unless
                  declared safe (`SAFE_TO_CHANGE`), and then recorded in config_changes.jsonl
  restore_intact  resume from the newest checkpoint that reads back, moving corrupt ones aside
  DivergenceGuard stop before an exploding δ is saved; never keep one as the best
  check_saves     a failed background checkpoint write stops the run at once
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time

from smat.errors import SmatError

# Fields of `config.train` that older config files lack (added by `smat.config.load`).
# The divergence guard: a log step whose loss or max|δ| passes these stops the run before the
# state is saved (a finite but exploded δ, e.g. 1e29 with a huge lr, is caught here, long before
# it is non-finite). 0 turns a check off.
TRAIN_DEFAULTS = {"max_loss": 1e4, "max_delta": 1e3}

# Fields a resumed run may change: they extend or tune the schedule of the same run, or touch only
# speed and bookkeeping. Anything else makes a different run.
SAFE_TO_CHANGE = ("train.epochs", "train.log_every", "train.keep_checkpoints",
                  "train.tasks_at_once", "train.max_loss", "train.max_delta", "data_dir",
                  "data.loader_threads", "data.prefetch", "backbone.remat", "val.batch_size",
                  "data.test")

CONFIG = "config.json"
CHANGES = "config_changes.jsonl"
LOCK = "lock"

_COUNTS = {  # field → minimum
    "data.meta_batch_size": 1, "data.image_size": 1, "data.ways": 2, "data.shots": 1,
    "data.queries": 1, "data.loader_threads": 0, "data.prefetch": 0, "experts.num_experts": 1,
    "train.epochs": 1, "train.episodes_per_epoch": 1, "train.log_every": 1,
    "train.keep_checkpoints": 1, "val.episodes": 1, "val.batch_size": 1, "seed": 0,
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def check_config(config) -> None:
  """Method, mask strategy, every count and the backbone of a meta-training config, before any
  work."""
  from smat.meta import tasks

  if config.method not in tasks.METHODS:
    raise SmatError(f"config field method={config.method!r}: not one of {list(tasks.METHODS)}")
  for field, minimum in _COUNTS.items():
    value = _get(config, field)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise SmatError(f"config field {field}={value!r}: must be an integer ≥ {minimum}")
  if config.train.episodes_per_epoch < config.data.meta_batch_size:
    raise SmatError(f"config field train.episodes_per_epoch={config.train.episodes_per_epoch} is "
                    f"less than one meta-batch (data.meta_batch_size="
                    f"{config.data.meta_batch_size}); raise it")
  from smat.models import checkpoint

  checkpoint.check_backbone_path(config.backbone.path)  # before the workdir is made


def prepare_workdir(workdir: str) -> None:
  """Create `workdir`; a path that is a file, or a directory that cannot be written, fails here."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise SmatError(f"--workdir {workdir}: is a file, not a directory; pick another path")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".probe-{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise SmatError(f"--workdir {workdir}: cannot write there ({e.strerror}); pick a writable "
                    f"directory") from None


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/lock`, which names its holder (pid, host, start time).

  The kernel releases a flock when its process dies, so a lock left by a killed run is stale by
  construction and simply taken over. Only the primary process of a multi-host run locks (they
  all share one workdir on a shared file system)."""

  def __init__(self, workdir: str, primary: bool = True):
    self.path = os.path.join(workdir, LOCK)
    self.primary = primary
    self.file = None

  def __enter__(self):
    if not self.primary:
      return self
    import fcntl

    self.file = open(self.path, "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self.file.seek(0)
      holder = _holder(self.file.read())
      self.file.close()
      self.file = None
      raise SmatError(f"{os.path.dirname(self.path)}: another `smat meta-train` is running in "
                      f"this workdir ({holder}); wait for it, stop it, or pick another "
                      f"--workdir") from None
    try:
      self.file.seek(0)
      self.file.truncate()
      json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, self.file)
      self.file.flush()
    except OSError as e:
      self.__exit__()
      raise SmatError(f"{self.path}: cannot write the workdir lock ({e.strerror}); free space "
                      f"or pick a writable --workdir") from None
    return self

  def __exit__(self, *exc):
    if self.file is not None:
      try:
        self.file.seek(0)
        self.file.truncate()
      except OSError:
        pass
      finally:
        try:
          self.file.close()  # closing releases the flock
        except OSError:  # buffered bytes that no longer fit on a full disk
          pass
        self.file = None


def _holder(text: str) -> str:
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']}, since {info['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(saved: dict, new: dict) -> dict:
  """{field: (saved value, new value)} of the leaves that differ (missing counts as None)."""
  a, b = _flat(saved), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(p.isdigit() for p in os.listdir(directory))


def record_config(workdir: str, config_json: str, step: int | None = None) -> None:
  """Write config.json for a fresh run; on a resume keep it, refusing changed values unless
  they are in `SAFE_TO_CHANGE` (recorded in config_changes.jsonl, then config.json updated)."""
  from smat import config as config_lib
  from smat import outputs

  path = os.path.join(workdir, CONFIG)
  new = json.loads(config_json)
  if not (os.path.isfile(path) and has_checkpoint(workdir)):
    outputs.write_atomic(path, lambda f: f.write(config_json))
    return
  old = config_lib.from_json(path).to_dict()  # fields added since filled with their defaults
  old = json.loads(json.dumps(old))  # tuples → lists, as in `new`
  changed = config_differences(old, new)
  unsafe = {k: v for k, v in changed.items() if k not in SAFE_TO_CHANGE}
  if unsafe:
    listed = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in unsafe.items())
    raise SmatError(f"{workdir} holds a run with another config ({listed}). A resume must use "
                    f"the run's own config ({path}); only {', '.join(SAFE_TO_CHANGE)} may "
                    f"change. Pick a new --workdir for a new run")
  if not changed:
    return
  with open(os.path.join(workdir, CHANGES), "a") as f:
    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step,
                        "changes": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}})
            + "\n")
  outputs.write_atomic(path, lambda f: f.write(config_json))
  print(f"{workdir}: resumed with " + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b)
                                               in changed.items()) + f" (recorded in {CHANGES})",
        file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _aside(directory: str, step: int, why: str) -> str:
  """Move checkpoint `step` of `directory` to `<directory>/<why>-<step>` (kept, never deleted)."""
  src = os.path.join(directory, str(step))
  dst = os.path.join(directory, f"{why}-{step}")
  n = 1
  while os.path.exists(dst):
    dst, n = os.path.join(directory, f"{why}-{step}.{n}"), n + 1
  os.replace(src, dst)
  return dst


def restore_intact(manager, restore, workdir: str, primary: bool = True):
  """`restore(step)` of the newest checkpoint in `manager` that reads back (None: no checkpoint).

  Newer ones that do not (a truncated array file) are moved aside to `checkpoints/corrupt-<step>`
  with a warning naming each and the reason. When none reads back nothing is moved (that is a
  run of another shape, not damage): one error line. The best checkpoint lives in the same
  manager, so nothing newer than the resumed step is left to be consistent with."""
  directory = os.path.join(workdir, "checkpoints")
  result, resumed, failed = None, None, []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      result, resumed = restore(step), step
      break
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
      failed.append((step, _first_line(e)))
  if failed and resumed is None:
    step, why = failed[0]
    raise SmatError(f"{directory}: no checkpoint reads back (step {step}: {why}); if they are "
                    f"damaged, move them away to start afresh, else resume with the run's own "
                    f"config")
  for step, why in failed:
    moved = _aside(directory, step, "corrupt") if primary else "left to the primary"
    print(f"warning: checkpoint {directory}/{step} is unreadable ({why}); skipped it ({moved}), "
          f"resuming from step {resumed}, the newest intact checkpoint", file=sys.stderr,
          flush=True)
  if failed:
    manager.reload()
  return result


def readable(restore, where: str):
  """`restore()`, or one error line naming the checkpoint when it does not read back."""
  try:
    return restore()
  except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint
    raise SmatError(f"{where}: checkpoint unreadable ({_first_line(e)}); evaluate another "
                    f"checkpoint or re-run `smat meta-train` to rewrite it") from None


def check_finite_params(params, where: str) -> None:
  """Every trainable value of a checkpoint finite (an evaluation would report chance)."""
  import jax
  import numpy as np

  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    value = np.asarray(leaf)
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      from smat.models.checkpoint import path_name

      name = path_name(path)
      raise SmatError(f"{where}: checkpoint holds non-finite values in {name}; the run diverged "
                      f"before it was saved — evaluate an earlier checkpoint")


def delta_max(params) -> float:
  """max |δ| over every expert's (or PMF's) δ."""
  import jax

  leaves = jax.tree.leaves(params.get("delta", {}))
  if not leaves:
    return 0.0
  return float(_max_abs(leaves))


def _max_abs(leaves):
  import jax
  import jax.numpy as jnp

  global _MAX_ABS
  if _MAX_ABS is None:
    _MAX_ABS = jax.jit(lambda xs: jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in xs])))
  return _MAX_ABS(leaves)


_MAX_ABS = None


def _last_good(manager, workdir: str) -> str:
  good = manager.latest_step()
  return (f"the last good checkpoint is step {good} in {workdir}/checkpoints" if good is not None
          else "no checkpoint was written yet")


WARN_FRACTION = 0.1  # a loss or max|δ| past this fraction of its limit is a divergence warning


class DivergenceGuard:
  """Divergence caught on the host-side metrics of log steps, before anything is non-finite.

  `check` stops the run at a log step whose |loss| or max|δ| passes `train.max_loss` /
  `train.max_delta` (the state is not saved, so no checkpoint ever holds an exploded δ) and
  warns past `WARN_FRACTION` of them. `promote` says whether a validated state may be the run's
  best: never with a non-finite accuracy, nor at chance after a warning."""

  def __init__(self, config, manager, workdir: str):
    self.max_loss = config.train.get("max_loss", TRAIN_DEFAULTS["max_loss"])
    self.max_delta = config.train.get("max_delta", TRAIN_DEFAULTS["max_delta"])
    fixed = config.data.get("sampler", "fixed") == "fixed"
    self.chance = 100.0 / config.data.ways if fixed else None
    self.manager, self.workdir = manager, workdir
    self.warned_at, self.good_before_warning = None, None

  def check(self, scalars: dict, params, step: int) -> None:
    loss = scalars.get("loss")
    values = {}
    if self.max_loss and loss is not None:
      values["loss"] = (abs(loss), self.max_loss, "train.max_loss")
    if self.max_delta:
      scalars["max_delta"] = delta_max(params)
      values["max|δ|"] = (scalars["max_delta"], self.max_delta, "train.max_delta")
    over = [f"{name} {v:.3g} > {field}={limit:g}" for name, (v, limit, field) in values.items()
            if not v <= limit]
    if over:
      good = _last_good(self.manager, self.workdir)
      if self.warned_at is not None:
        good = (f"the last checkpoint before the divergence warning at step {self.warned_at} is "
                f"step {self.good_before_warning} in {self.workdir}/checkpoints")
      raise SmatError(f"training diverged at step {step} ({', '.join(over)}); stopped before "
                      f"saving it and {good}. Lower "
                      f"optim.delta_lr / optim.gate_lr or raise optim.warmup_epochs and run "
                      f"again (or raise train.max_loss / train.max_delta if this is expected)")
    near = [f"{name} {v:.3g}" for name, (v, limit, _) in values.items()
            if v > WARN_FRACTION * limit]
    if near and self.warned_at is None:
      self.warned_at, self.good_before_warning = step, self.manager.latest_step()
      print(f"warning: step {step}: {', '.join(near)} near the divergence limits "
            f"(train.max_loss / train.max_delta); the last checkpoint before it is step "
            f"{self.good_before_warning}", file=sys.stderr, flush=True)

  def promote(self, result: dict, step: int) -> bool:
    """Whether the state validated at `step` may be kept as the best (raises when non-finite)."""
    if not math.isfinite(result["accuracy"]) or not math.isfinite(result["ci95"]):
      raise SmatError(f"validation at step {step} is non-finite ({result['accuracy']}); the "
                      f"state was not saved and {_last_good(self.manager, self.workdir)}")
    if (self.warned_at is not None and self.chance is not None
        and result["accuracy"] <= self.chance + result["ci95"]):
      print(f"warning: validation at step {step} is at chance ({result['accuracy']:.2f}% for "
            f"1/{round(100 / self.chance)} = {self.chance:.2f}%) after the divergence warning at "
            f"step {self.warned_at}: not kept as the best; the last checkpoint before the "
            f"warning, step {self.good_before_warning}, is the good one", file=sys.stderr,
            flush=True)
      return False
    return True


class WriteError(SmatError):
  """A checkpoint write failed (disk full, I/O error): the CLI ends the process at once, so that
  background writers' exit handlers add no tracebacks to the one error line."""


def _save_failed(manager, e: BaseException) -> SmatError:
  intact = [step for step in manager.all_steps()
            if os.path.isdir(os.path.join(manager.directory, str(step)))]
  kept = (f"the last intact checkpoint is step {max(intact)} in {manager.directory}" if intact
          else "no checkpoint was written yet")
  return WriteError(f"writing a checkpoint in {manager.directory} failed ({_first_line(e)}); the "
                   f"run stopped and {kept}. Free disk space and run the same command again to "
                   f"resume")


def save(save_fn, manager, *args, **kwargs) -> None:
  """`save_fn(manager, ...)`; the failure of a previous background write (which orbax raises
  here) as one line."""
  try:
    save_fn(manager, *args, **kwargs)
  except SmatError:
    raise
  except Exception as e:  # whatever the writer raised
    raise _save_failed(manager, e) from None


def check_saves(*managers) -> None:
  """Raise a background checkpoint write's failure (disk full, I/O error) as one line, now."""
  for manager in managers:
    try:
      manager.check_for_errors()
    except Exception as e:  # whatever the writer raised
      raise _save_failed(manager, e) from None


def finish_saves(*managers) -> None:
  """`wait_until_finished` of each manager, a failure raised as one line."""
  failure = None
  for manager in managers:
    try:
      manager.wait_until_finished()
    except Exception as e:  # whatever the writer raised
      failure = failure or _save_failed(manager, e)
  if failure:
    raise failure


class _WriterErrors(logging.Filter):
  """Drops the error records of orbax's background writers (with their tracebacks, and those
  of the asyncio futures and thread-pool callbacks they run on): a failed write is raised as one
  `error:` line by `check_saves` / `finish_saves` (or the CLI) instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    return not (record.name in ("asyncio", "concurrent.futures")
                or f"{os.sep}orbax{os.sep}" in record.pathname)


def quiet_orbax_errors() -> None:
  """Install `_WriterErrors` on the loggers orbax's writers log through (once)."""
  for name in ("absl", "asyncio", "concurrent.futures", ""):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _WriterErrors) for f in logger.filters):
      logger.addFilter(_WriterErrors())
