"""What every trainer shares: the metrics log, orbax checkpoint managers, device placement."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from smat.errors import SmatError


class MetricsLog:
  """Scalars to `<workdir>/metrics.jsonl` and TensorBoard (`<workdir>/tensorboard`)."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """Rows past `resume_step` (logged after the checkpoint a resumed run starts from) are
    dropped, so the file reads like one uninterrupted run."""
    from tensorboardX import SummaryWriter

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
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for name, value in scalars.items():
      if isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
          self.tb.add_scalar(f"{name}/{k}", v, step)
      elif isinstance(value, (int, float)):
        self.tb.add_scalar(name, value, step)

  def close(self):
    self.jsonl.close()
    self.tb.close()


def to_host(metrics: dict) -> dict:
  """Device metrics → floats, and lists of floats for vectors."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v, np.float64)
    out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
  return out


def checkpoint_manager(directory: str, keep: int, best_metric: str | None = None):
  """Orbax manager in `directory`; with `best_metric` it keeps only the `keep` best steps."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      best_fn=(lambda m: m[best_metric]) if best_metric else None,
      best_mode="max")
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


def local_slice(tree, sharding: NamedSharding, global_size: int):
  """Global array from this process's slice of a host batch (leading axis = global batch)."""
  local = global_size // jax.process_count()
  first = jax.process_index() * local
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)[first:first + local]),
      tree)
