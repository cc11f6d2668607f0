"""Meta-training (`smat.metatrain`): exact resume, 1 device vs 2 processes × 2 devices, non-finite
stop, validation and the best checkpoint, logs, compilations per bucket, sparsity control and
`smat meta-train`.

Every run uses a one-block, 16-wide ViT on 16-px glyphs. One SMAT run (`shared`, 100 steps of
4 tasks) is trained once and read by most tests; the other runs use the same config, so with
this module's persistent compilation cache they load the jitted step instead of compiling it
again (compilation dominates the run time). The two-process (jax.distributed) run starts in
subprocesses before the shared run so they compile side by side.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from typing import NamedTuple

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from smat import cli, sparsity, training
from smat import config as config_lib
from smat import metatrain
from smat.data import loader
from smat.errors import SmatError
from smat.meta import experts
from smat.meta import step as meta_step
from smat.models import checkpoint, convert

SMAT = "smat_glyphs:smoke"
PMF = "pmf_glyphs:smoke"
TASKS = 4  # data.meta_batch_size of the shared run
PER_EPOCH = 50  # steps per epoch: 200 episodes / 4 tasks
TOTAL = 100  # 2 epochs
TAU = 0.5
QUERIES = 3 * 2  # smoke episodes: 3 ways × 2 queries

# The shared SMAT run (without augmentation, which tests/test_meta_units.py covers, so that its
# query loss shows learning over 100 steps). Learning rates are pinned so that edits to smat_glyphs do not
# silently change what the sparsity test measures. L_sparse's gradient per gate scales as
# 1 / (backbone size): the paper's gate_lr 1e6 is tuned for ViT-S (22M weights); on this 3.3k-weight
# backbone it throws every gate to its clamp in one update, so the run uses 1e3.
SHARED = (
    "--config.data.meta_batch_size=4", "--config.train.epochs=2",
    "--config.train.episodes_per_epoch=200", "--config.train.log_every=1",
    "--config.train.keep_checkpoints=2", "--config.optim.warmup_epochs=0",
    "--config.optim.cosine_epochs=4", "--config.optim.first_epoch_lr=-1",
    f"--config.experts.target_sparsity={TAU}", "--config.optim.gate_lr=1e3",
    "--config.optim.lambda_lr=0.5", "--config.optim.delta_lr=0.01",
    "--config.router.temperature_decay_tasks=90.0", "--config.augment.enabled=False",
)


class Shared(NamedTuple):
  config: object
  workdir: object  # pathlib.Path
  summary: dict


class Saved(NamedTuple):
  state: meta_step.MetaState
  rng: np.ndarray
  data: dict


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def overrides(base):
  return [*base, *SHARED]


_TWO_PROCESSES = """
import argparse, json, sys
from smat import cli, config as config_lib, metatrain
cli._distributed(argparse.Namespace(distributed=True))  # as `smat meta-train --distributed`
import jax
assert (jax.process_count(), jax.device_count()) == (2, 4), jax.devices()
config = config_lib.load(sys.argv[1], json.loads(sys.argv[2]))
metatrain.train_and_evaluate(config, sys.argv[3], stop_after=int(sys.argv[4]), progress=False)
"""


@pytest.fixture(scope="module")
def two_processes(overrides, tmp_path_factory):
  """The shared config's first epoch on two processes of two fake CPU devices each (one task
  per device), joined through jax.distributed on localhost and writing one workdir, in the
  background."""
  import socket

  root = tmp_path_factory.mktemp("two_processes")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION_CACHE") and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             SMAT_NUM_PROCESSES="2", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  for rank in range(2):
    log = open(root / f"log{rank}.txt", "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-c", _TWO_PROCESSES, SMAT, json.dumps(overrides), str(root / "run"),
         str(PER_EPOCH)], env={**env, "SMAT_PROCESS_ID": str(rank)}, stdout=log,
        stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  yield procs, root
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def shared(overrides, two_processes, tmp_path_factory):
  """The uninterrupted reference run (started after the multi-host subprocesses)."""
  del two_processes  # only started here, so that they compile while this run does
  config = config_lib.load(SMAT, overrides)
  workdir = tmp_path_factory.mktemp("shared")
  summary = metatrain.train_and_evaluate(config, str(workdir), progress=False)
  return Shared(config, workdir, summary)


# ----------------------------------------------------------------------------- helpers


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train_rows(workdir) -> list[dict]:
  return [r for r in _rows(workdir) if "loss" in r]


def _without_timing(row: dict) -> dict:
  return {k: v for k, v in row.items() if k not in ("tasks_per_s", "episodes_per_s")}


def _steps(directory) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _best_step(workdir) -> int:
  return metatrain.find_checkpoint(str(workdir))[1]


def _saved(config, workdir, step=None, which="checkpoints") -> Saved:
  """Everything a checkpoint holds: the full MetaState, the RNG and the stream position."""
  template = metatrain.setup(config)[3]
  manager = training.checkpoint_manager(str(workdir / which), config.train.keep_checkpoints)
  try:
    state, rng, data = metatrain.restore(manager, template, jax.random.key(0), step)
  finally:
    manager.close()
  return Saved(jax.device_get(state), np.asarray(jax.random.key_data(rng)), data)


def _assert_same_checkpoint(a: Saved, b: Saved) -> None:
  chex.assert_trees_all_equal(a.state, b.state)  # params (δ, gates, λ, router), opt state, ...
  np.testing.assert_array_equal(a.rng, b.rng)
  assert a.data == b.data


def _tensorboard_scalars(directory) -> dict:
  """{(tag, step): value} from the TFRecord event files under `directory`."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


# ----------------------------------------------------------------------------- tests


def test_resumed_runs_equal_the_uninterrupted_run(shared, tmp_path):
  """Stopped at an epoch end, then killed between checkpoints, then resumed: bit-identical."""
  config = shared.config
  first = metatrain.train_and_evaluate(config, str(tmp_path), stop_after=PER_EPOCH,
                                       progress=False)
  assert (first["stopped_at"], first["tasks_seen"]) == (PER_EPOCH, TASKS * PER_EPOCH)
  epoch_one = _saved(config, tmp_path)
  assert (int(epoch_one.state.step), int(epoch_one.state.tasks_seen)) == (PER_EPOCH, 200)
  _assert_same_checkpoint(_saved(config, shared.workdir, PER_EPOCH), epoch_one)

  # A crash 13 steps into epoch 2: nothing is saved after step 50, the log runs to step 63.
  crashed = metatrain.train_and_evaluate(config, str(tmp_path), stop_after=PER_EPOCH + 13,
                                         progress=False)
  assert crashed["stopped_at"] == PER_EPOCH + 13
  assert _steps(tmp_path / "checkpoints") == [PER_EPOCH]
  assert _train_rows(tmp_path)[-1]["step"] == PER_EPOCH + 13

  resumed = metatrain.train_and_evaluate(config, str(tmp_path), progress=False)
  assert (resumed["stopped_at"], resumed["tasks_seen"]) == (TOTAL, TASKS * TOTAL)
  final = _saved(config, tmp_path)
  assert int(final.state.step) == TOTAL and int(final.state.bad_step) == -1
  _assert_same_checkpoint(_saved(config, shared.workdir), final)
  assert _best_step(tmp_path) == _best_step(shared.workdir)
  _assert_same_checkpoint(_saved(config, shared.workdir, _best_step(shared.workdir)),
                          _saved(config, tmp_path, _best_step(tmp_path)))
  assert resumed["best"] == shared.summary["best"]

  # metrics.jsonl reads like one run: each step once, every value as in the uninterrupted run.
  rows, reference = _rows(tmp_path), _rows(shared.workdir)
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, TOTAL + 1))
  assert [r["step"] for r in rows if "val_accuracy" in r] == [PER_EPOCH, TOTAL]
  assert list(map(_without_timing, rows)) == list(map(_without_timing, reference))
  history = json.loads((tmp_path / "validation.json").read_text())
  assert list(map(_without_timing, history)) == list(map(
      _without_timing, json.loads((shared.workdir / "validation.json").read_text())))


def _assert_first_epoch_matches_one_device(shared, run_dir) -> None:
  """The first epoch of a data-parallel run equals this 1-device process's: state, RNG, stream
  position and every logged loss (exactly one row per step)."""
  one = _saved(shared.config, shared.workdir, PER_EPOCH)
  other = _saved(shared.config, run_dir)
  assert (int(other.state.step), int(other.state.tasks_seen)) == (PER_EPOCH, TASKS * PER_EPOCH)
  assert other.data == one.data
  np.testing.assert_array_equal(other.rng, one.rng)
  # Reductions over the task axis run in another order; observed differences are ≤ 6e-6. A
  # sharding bug (devices on different tasks, unsynchronised gradients) moves δ by O(0.1).
  assert max(np.abs(d).max() for d in jax.tree.leaves(one.state.params["delta"])) > 0.1
  dense = lambda params: {k: v for k, v in params.items() if k != "gates"}
  chex.assert_trees_all_close(dense(other.state.params), dense(one.state.params), atol=2e-4,
                              rtol=0)
  # Gate logits move by lr 1e3 × their gradient, and a gate on the edge of z's clip (where its
  # gradient switches on) can take or skip a step on a last-bit difference: observed, one of
  # 1024 logits of a leaf off by 2.4e-3. A sharding bug moves most gates by O(1).
  gaps = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(other.state.params["gates"]), jax.tree.leaves(one.state.params["gates"]))])
  assert gaps.max() < 0.05 and np.mean(gaps > 2e-4) < 0.005, (gaps.max(), np.mean(gaps > 2e-4))
  chex.assert_trees_all_close(other.state.router_state, one.state.router_state, atol=2e-4,
                              rtol=0)
  rows = _train_rows(run_dir)
  assert [r["step"] for r in rows] == list(range(1, PER_EPOCH + 1))
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in _train_rows(shared.workdir)[:PER_EPOCH]],
                             rtol=1e-4)


def test_two_processes_of_two_devices_match_one_device(shared, two_processes):
  """Data parallelism within and across hosts: two processes of two CPU devices each (one task
  per device, half of every meta-batch per process, joined by jax.distributed) reach the state
  of this 1-device process, and only the first process writes the logs (one row per step)."""
  if jax.device_count() != 1:
    pytest.skip("the reference run must be on one device")
  procs, root = two_processes
  for rank, proc in enumerate(procs):
    proc.wait(timeout=600)
    assert proc.returncode == 0, (root / f"log{rank}.txt").read_text()[-4000:]
  _assert_first_epoch_matches_one_device(shared, root / "run")


def test_one_manager_keeps_the_latest_steps_and_the_best(tmp_path):
  """Latest-N and best-1 preservation in one manager: a tie goes to the later step, a step saved
  without metrics (refused by the divergence guard) is never the best, and the best survives
  long after it left the latest N."""
  import orbax.checkpoint as ocp

  accuracy = {1: 50.0, 2: 90.0, 3: 30.0, 4: 90.0, 5: None, 6: 95.0, 7: 20.0, 8: None, 9: 10.0}
  manager = training.checkpoint_manager(str(tmp_path), 2, "val_accuracy")
  for step, acc in accuracy.items():
    manager.save(step, args=ocp.args.StandardSave({"x": np.full(3, step, np.float32)}),
                 metrics=None if acc is None else {"val_accuracy": acc})
    manager.wait_until_finished()
    if step == 5:
      assert manager.all_steps() == [4, 5] and manager.best_step() == 4  # the tie's later step
  assert manager.all_steps() == [6, 8, 9] and manager.best_step() == 6
  restored = manager.restore(6, args=ocp.args.StandardRestore())
  np.testing.assert_array_equal(restored["x"], np.full(3, 6.0))
  manager.close()
  latest_only = training.checkpoint_manager(str(tmp_path / "plain"), 2)
  for step in range(1, 5):
    latest_only.save(step, args=ocp.args.StandardSave({"x": np.zeros(1)}))
  latest_only.wait_until_finished()
  assert latest_only.all_steps() == [3, 4]


_TWO_MANAGERS = """
import os, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np, orbax.checkpoint as ocp
from smat import training
replicated, _ = training.shardings(training.data_mesh())
x = training.replicate({"x": np.arange(64, dtype=np.float32)}, replicated)
managers = [training.checkpoint_manager(os.path.join(sys.argv[3], name), 1)
            for name in ("checkpoints", "best")]
for step in range(1, 21):
  for manager in managers:
    manager.save(step, args=ocp.args.StandardSave(x))
for manager in managers:
  manager.wait_until_finished()
  assert manager.latest_step() == 20
  manager.close()
"""


def test_two_checkpoint_managers_save_together_on_two_processes(tmp_path):
  """Two managers saving at the same steps (a resumed old run's "checkpoints" and legacy
  "best", two runs in one process): on several processes their background commits must not
  share barrier keys (without distinct prefixes this fails within a few steps with "barrier ...
  is already ongoing")."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_COMPILATION_CACHE") and k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_MANAGERS, address, str(rank),
                             str(tmp_path)], env={**env, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for rank in range(2)]
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=120)
      assert proc.returncode == 0, out[-3000:]
  finally:
    for proc in procs:
      proc.kill()
  assert _steps(tmp_path / "checkpoints") == _steps(tmp_path / "best") == [20]


def test_tasks_at_once_split_every_devices_share_into_chunks():
  """`train.tasks_at_once` sets the chunks of each device's share of the meta-batch; one that
  does not divide the share is an error naming the field and what to pick."""
  def chunks(tasks, at_once, devices):
    config = config_lib.load(SMAT, [f"--config.data.meta_batch_size={tasks}",
                                    f"--config.train.tasks_at_once={at_once}"])
    return metatrain.task_chunks(config, devices)

  assert chunks(8, 0, 1) == 1 and chunks(8, 0, 4) == 1
  assert chunks(8, 1, 1) == 8 and chunks(8, 1, 4) == 2 and chunks(8, 2, 2) == 2
  with pytest.raises(SmatError, match=r"train\.tasks_at_once=3: each of the 1 device\(s\) runs "
                                      r"4 of data\.meta_batch_size=4 .* divisor of 4"):
    chunks(4, 3, 1)
  with pytest.raises(SmatError, match=r"runs 2 of .* divisor of 2"):
    chunks(4, 4, 2)


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(shared, overrides, backbone,
                                                                  tmp_path):
  # Resume from the shared run's epoch-1 checkpoint with θ_pre × 1e30: finite weights whose
  # features overflow, so step 51's loss is NaN (same shapes: the step is not recompiled).
  params, vit_config = checkpoint.load(str(backbone))
  checkpoint.save(str(tmp_path / "huge"), jax.tree.map(lambda p: p * 1e30, params), vit_config)
  workdir = tmp_path / "run"
  shutil.copytree(shared.workdir / "checkpoints" / str(PER_EPOCH),
                  workdir / "checkpoints" / str(PER_EPOCH))
  config = config_lib.load(SMAT, [*overrides, f"--config.backbone.path={tmp_path / 'huge'}"])
  with pytest.raises(SmatError, match=rf"non-finite .* at step {PER_EPOCH + 1}\b.*last good "
                                      rf"checkpoint is step {PER_EPOCH} in .*checkpoints"):
    metatrain.train_and_evaluate(config, str(workdir), progress=False)
  assert _steps(workdir / "checkpoints") == [PER_EPOCH]
  kept = _saved(config, workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((kept.state.params,
                                                               kept.state.opt_state)))
  _assert_same_checkpoint(_saved(shared.config, shared.workdir, PER_EPOCH), kept)


def test_validation_every_epoch_and_best_checkpoint_reproduce(shared):
  config = shared.config
  history = json.loads((shared.workdir / "validation.json").read_text())
  assert [(h["step"], h["epoch"]) for h in history] == [(PER_EPOCH, 1), (TOTAL, 2)]
  for h in history:
    assert 0 <= h["accuracy"] <= 100 and h["ci95"] >= 0
    assert h["episodes"] == config.val.episodes
    # Each episode scores k/6; the mean of 4 is a multiple of 100/24.
    units = h["accuracy"] * config.val.episodes * QUERIES / 100
    assert abs(units - round(units)) < 1e-4
    assert len(h["alpha_mean"]) == config.experts.num_experts
    assert sum(h["alpha_mean"]) == pytest.approx(1.0, abs=1e-5)  # α is normalised per task
  best_accuracy = max(h["accuracy"] for h in history)
  best_steps = [h["step"] for h in history if h["accuracy"] == best_accuracy]
  manager, best_step, where = metatrain.find_checkpoint(str(shared.workdir))
  assert best_step in best_steps and best_step == max(best_steps)  # ties: the latest
  assert where == f"{shared.workdir}/checkpoints/{best_step}"
  assert manager.metrics(best_step) == {"val_accuracy": best_accuracy}
  assert shared.summary["best"]["val_accuracy"] == best_accuracy
  # One manager keeps the latest epochs and the best, each written once; no best/ beside it.
  assert _steps(shared.workdir / "checkpoints") == sorted(
      {best_step, *[h["step"] for h in history][-config.train.keep_checkpoints:]})
  assert not (shared.workdir / "best").exists()

  run = metatrain.load_run(str(shared.workdir))
  assert run.hp.method == "smat" and run.tasks_seen == TASKS * best_step
  result = metatrain.evaluate(run, metatrain.validation_batches(config))
  assert result["accuracy"] == best_accuracy
  assert result["episodes"] == config.val.episodes
  recorded = next(h for h in history if h["step"] == best_step)
  np.testing.assert_allclose(result["alpha_mean"], recorded["alpha_mean"], rtol=1e-6)


def test_metrics_rows_and_tensorboard(shared):
  config = shared.config
  rows = _train_rows(shared.workdir)
  assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
  experts = config.experts.num_experts
  r = config.router
  for row in rows:
    assert row["tasks_seen"] == TASKS * row["step"]
    # T_sel of the step uses the tasks seen before it.
    expected_t = max(r.temperature_floor,
                     r.temperature_start - TASKS * (row["step"] - 1) / r.temperature_decay_tasks)
    assert row["temperature"] == pytest.approx(expected_t, rel=1e-6)
    assert len(row["expert_sparsity"]) == experts and len(row["lam"]) == experts
    assert all(0 <= s <= 1 for s in row["expert_sparsity"])
    assert np.isfinite(row["loss"]) and row["finite"] == 1.0
    units = row["query_accuracy"] * TASKS * QUERIES  # mean of 4 tasks' k/6
    assert abs(units - round(units)) < 1e-4
  assert rows[-1]["temperature"] > r.temperature_floor  # the anneal is still running
  # The per-epoch schedule on every group (no warm-up, horizon 4 epochs): the peak lr through
  # epoch 0, ½ (1 + cos(π / 4)) of it through epoch 1.
  peaks = {"delta": config.optim.delta_lr, "gates": config.optim.gate_lr,
           "lam": config.optim.lambda_lr, "router": config.optim.router_lr}
  for group, peak in peaks.items():
    later = peak * 0.5 * (1 + math.cos(math.pi / 4))
    assert [r[f"{group}_lr"] for r in rows] == (
        [pytest.approx(peak, rel=1e-6)] * PER_EPOCH + [pytest.approx(later, rel=1e-6)] * PER_EPOCH)
  # The logged λ of the last step is the λ the final checkpoint holds.
  final = _saved(config, shared.workdir)
  np.testing.assert_array_equal(np.float32(rows[-1]["lam"]), final.state.params["lam"])

  scalars = _tensorboard_scalars(shared.workdir / "tensorboard")
  assert {step for tag, step in scalars if tag == "loss"} == set(range(1, TOTAL + 1))
  for row in (rows[0], rows[-1]):
    assert scalars[("loss", row["step"])] == pytest.approx(row["loss"], rel=1e-6)
    for k in range(experts):
      assert scalars[(f"expert_sparsity/{k}", row["step"])] == pytest.approx(
          row["expert_sparsity"][k], rel=1e-6)
  for h in json.loads((shared.workdir / "validation.json").read_text()):
    assert scalars[("val_accuracy", h["step"])] == pytest.approx(h["accuracy"], rel=1e-6)


def test_sparsity_settles_at_target_and_loss_falls(shared):
  """λ raises every expert's deployed sparsity (its deterministic meta-test mask) from 0
  (log α ~ N(0, 0.5²): no gate below logit(1/12)) to τ; λ resets at the step that reaches it
  and the sparsity stays exactly there (no gate pushed further, none revived), so the budget
  overshoots by at most that one step's rise, under 0.1 at this λ lr (observed 0.081 and 0.054
  for overshoots of 0.054 and 0.039); the masks meta-test loads have it."""
  rows = _train_rows(shared.workdir)
  sparsity = np.array([r["expert_sparsity"] for r in rows])
  assert sparsity[0].max() < 0.01
  for k in range(sparsity.shape[1]):
    (reached, *_), = np.nonzero(sparsity[:, k] > TAU)
    assert reached < len(rows) - 20  # met with time to spare, then held
    assert np.all(sparsity[reached:, k] == sparsity[reached, k])  # held, not pushed on
    assert sparsity[reached, k] - sparsity[reached - 1, k] < 0.1  # one update's rise
    assert all(r["lam"][k] == 0.0 for r in rows[reached:])  # reset, and never pushed again
  gate_logits = _saved(shared.config, shared.workdir).state.params["gates"]
  theta_pre = metatrain.setup(shared.config)[0]
  deployed = experts.sparsity(experts.eval_masks(gate_logits), theta_pre)
  np.testing.assert_allclose(np.asarray(deployed), sparsity[-1], atol=1e-6)
  lam = np.array([r["lam"] for r in rows])
  assert lam.min() >= 0 and lam.max() > 0.1  # λ ≥ 0 after its projection, and it did act
  # The task's query CE falls (the total loss holds L_lagr, which is negative while λ grows).
  loss = np.array([r["query_ce"] for r in rows])
  quarter = len(loss) // 4
  assert loss[-quarter:].mean() < loss[:quarter].mean()


def test_compiles_once_per_bucket_not_per_episode(shared, base):
  """Variable-way episodes pad to a few (support, query) buckets: one compile per bucket."""
  config = config_lib.load(PMF, [
      *base, "--config.data.sampler=md", "--config.data.max_ways=12",
      "--config.data.max_support=40", "--config.data.max_query_per_class=3",
      "--config.data.meta_batch_size=2"])
  theta_pre, hp, optimizer, state = metatrain.setup(config)
  source = loader.episode_source(config, "train")
  assert source.buckets.count == 4  # support (32, 40) × query (32, 36)
  plans = [source.plan(i)[1] for i in range(60)]
  assert len({p.ways for p in plans}) > 3
  assert len({(p.ways, p.num_support, p.num_query) for p in plans}) > 20
  step_fn = meta_step.jit_step(hp, optimizer)
  shapes = set()
  for batch in loader.batch_iterator(source, 2, 30, num_threads=1):
    shapes.add(batch.shape_key)
    state, metrics = step_fn(state, batch, jax.random.key(0), theta_pre)
  assert int(state.step) == 30 and np.isfinite(float(metrics["loss"]))
  assert 1 < len(shapes) <= source.buckets.count
  assert step_fn._cache_size() == len(shapes)

  # SMAT's state (gates, λ, router state, optimiser) comes back with the shapes, dtypes and weak
  # types it went in with, so feeding it back never retraces (checked by tracing only).
  theta_pre, hp, optimizer, state = metatrain.setup(shared.config)
  batch = next(iter(loader.batch_iterator(loader.episode_source(shared.config, "train"), TASKS,
                                          1, num_threads=1)))
  avals = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type),
                                    jax.eval_shape(lambda t: t, tree))
  out, _ = jax.eval_shape(meta_step.jit_step(hp, optimizer), state, batch, jax.random.key(0),
                          theta_pre)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  assert avals(out) == avals(state)


def test_cli_meta_train(base, tmp_path, capsys):
  code = cli.main(["meta-train", "--config", PMF, "--workdir", str(tmp_path / "pmf"), *base,
                   "--config.data.test=glyphs:ood"])
  out = capsys.readouterr().out
  assert code == 0
  history = json.loads((tmp_path / "pmf" / "validation.json").read_text())
  assert [h["step"] for h in history] == [2, 4]  # smoke: 2 epochs of 2 steps
  best = max(reversed(history), key=lambda h: h["accuracy"])  # ties: the latest, as kept
  assert _best_step(tmp_path / "pmf") == best["step"]
  assert (f"pmf: best validation accuracy {best['accuracy']:.2f} ± {best['ci95']:.2f}% at step "
          f"{best['step']} ({tmp_path / 'pmf'}/checkpoints/{best['step']})") in out

  # Without --domains, evaluate tests the run's benchmark (its config's data.test).
  data_dir = next(o.split("=", 1)[1] for o in base if o.startswith("--config.data_dir="))
  result = tmp_path / "r.json"
  assert cli.main(["evaluate", "--workdir", str(tmp_path / "pmf"), "--episodes", "2", "--ways",
                   "3", "--shots", "1", "--queries", "1", "--data-dir", data_dir,
                   "--out", str(result)]) == 0
  assert list(json.loads(result.read_text())["domains"]) == ["glyphs:ood"]
  # Exported, PMF's backbone is θ_pre + δ of the best checkpoint, in timm's layout.
  exported = tmp_path / "pmf.safetensors"
  assert cli.main(["export", "--workdir", str(tmp_path / "pmf"), "--out", str(exported)]) == 0
  run = metatrain.load_run(str(tmp_path / "pmf"))
  tensors, meta = _read_export(exported)
  assert meta["model"] == "θ_pre + δ" and meta["method"] == "pmf" and "blocks.0.attn.qkv.weight" in tensors
  again = convert.convert(tensors, "timm", run.hp.vit)
  by_hand = jax.tree.map(lambda p, d: np.asarray(p) + np.asarray(d), run.theta_pre,
                         run.params["delta"])
  chex.assert_trees_all_close(again, by_hand, atol=0, rtol=0)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(run.params["delta"])) > 0
  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(tmp_path / "pmf"), "--alpha", "uniform",
                   "--out", str(exported)]) == 2
  assert "one backbone for every task" in capsys.readouterr().err

  code = cli.main(["meta-train", "--config", PMF, "--workdir", str(tmp_path / "typo"), *base,
                   "--config.optim.nope=1"])
  err = capsys.readouterr().err
  assert code == 2
  assert "optim.nope" in err and err.startswith("error:")
  assert not (tmp_path / "typo").exists()


def test_meta_train_on_a_folder_of_your_own_classes(base, tmp_path, capsys):
  """A folder of class sub-folders, its classes split in the SPEC, meta-trains and validates on
  its own classes; without the split the error says how to add one."""
  root = tmp_path / "mine"
  rng = np.random.default_rng(0)
  for c in range(8):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
          root / f"class{c}" / f"{i}.png")
  spec = f"folder:{root}?split=5/3/0"
  workdir = tmp_path / "run"
  code = cli.main(["meta-train", "--config", SMAT, "--workdir", str(workdir), *base,
                   f"--config.data.train={spec}", f"--config.data.val={spec}"])
  assert code == 0, capsys.readouterr().err
  history = json.loads((workdir / "validation.json").read_text())
  assert [h["step"] for h in history] == [2, 4]
  assert all(0 <= h["accuracy"] <= 100 for h in history)
  assert json.loads((workdir / "config.json").read_text())["data"]["train"] == spec
  code = cli.main(["meta-train", "--config", SMAT, "--workdir", str(tmp_path / "nosplit"), *base,
                   f"--config.data.train=folder:{root}", f"--config.data.val={spec}"])
  err = capsys.readouterr().err
  assert code == 2 and "no train classes" in err and "?split=70/15/15" in err


def _read_export(path):
  """(tensors, metadata with JSON values decoded) of an exported safetensors file."""
  from safetensors import safe_open
  from safetensors.numpy import load_file

  with safe_open(str(path), framework="numpy") as f:
    raw = f.metadata()
  meta = {}
  for key, value in raw.items():
    try:
      meta[key] = json.loads(value)
    except ValueError:
      meta[key] = value
  return load_file(str(path)), meta


def _support_folder(root, classes=3, per_class=2, size=16):
  rng = np.random.default_rng(0)
  for c in range(classes):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (size + 4, size, 3), dtype=np.uint8)).save(
          root / f"class{c}" / f"{i}.png")
  return root


def test_export_theta_task_and_merged_models_of_a_smat_run(shared, tmp_path, capsys):
  """θ_task for a support set is θ_pre + (Σ_k α_k z_k) ⊙ δ with the α the router gives that
  support and the deterministic gates, written in timm's layout; the merged model at given α
  is the same formula; a run without --support or --alpha is refused."""
  from smat import export
  from smat.meta import gates as hc

  workdir = str(shared.workdir)
  run = metatrain.load_run(workdir, "checkpoints")
  support = _support_folder(tmp_path / "support")
  out = tmp_path / "task.safetensors"
  assert cli.main(["export", "--workdir", workdir, "--checkpoint", "checkpoints",
                   "--support", str(support), "--out", str(out)]) == 0
  tensors, meta = _read_export(out)
  alpha = np.asarray(meta["alpha"])
  assert meta["model"] == "θ_task" and alpha.shape == (run.hp.experts.num_experts,)
  assert alpha.sum() == pytest.approx(1.0, abs=1e-6)
  assert meta["architecture"]["width"] == run.hp.vit.width
  theta = convert.convert(tensors, "timm", run.hp.vit)

  def by_hand(weights):  # z = clip(σ(log α)(ζ − γ) + γ, 0, 1) per expert, then the sum
    def leaf(p, d, g):
      if g.size == 0:
        return np.asarray(p)
      z = np.clip(1 / (1 + np.exp(-np.asarray(g, np.float64))) * (hc.ZETA - hc.GAMMA)
                  + hc.GAMMA, 0, 1)
      return np.asarray(p) + np.tensordot(weights, z, axes=1) * np.asarray(d)
    return jax.tree.map(leaf, run.theta_pre, run.params["delta"], run.params["gates"])

  chex.assert_trees_all_close(theta, by_hand(alpha), atol=1e-6, rtol=0)
  # The router's α for this support, computed on its own, is what the file records.
  episode = export.support_episode(str(support), run.hp.vit.image_size, 146 / 128)
  _, routed = export.task_params(run, episode)
  np.testing.assert_allclose(routed, alpha, atol=1e-6)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(run.theta_pre)))
  assert moved > 0  # θ_task is not θ_pre
  # A corrupt image in the support fails with the flag to pass, and with it is left out.
  first_class = sorted(p for p in support.iterdir() if p.is_dir())[0]
  (first_class / "broken.png").write_bytes(b"not an image")
  capsys.readouterr()
  export_args = ["export", "--workdir", workdir, "--checkpoint", "checkpoints", "--support",
                 str(support), "--out", str(out)]
  assert cli.main(export_args) == 2
  assert "--skip-corrupt" in capsys.readouterr().err
  assert cli.main([*export_args, "--skip-corrupt"]) == 0
  np.testing.assert_allclose(_read_export(out)[1]["alpha"], alpha, atol=1e-6)

  weights = [3.0] + [1.0] * (run.hp.experts.num_experts - 1)
  assert cli.main(["export", "--workdir", workdir, "--checkpoint", "checkpoints", "--alpha",
                   ",".join(map(str, weights)), "--out", str(out)]) == 0
  tensors, meta = _read_export(out)
  normalised = np.asarray(weights) / sum(weights)
  assert meta["model"] == "merged"
  np.testing.assert_allclose(meta["alpha"], normalised, rtol=1e-6)
  chex.assert_trees_all_close(convert.convert(tensors, "timm", run.hp.vit), by_hand(normalised),
                              atol=1e-6, rtol=0)
  capsys.readouterr()
  assert cli.main(["export", "--workdir", workdir, "--out", str(out)]) == 2
  assert "--support DIR" in capsys.readouterr().err
  too_many = ",".join(["1"] * (run.hp.experts.num_experts + 1))
  assert cli.main(["export", "--workdir", workdir, "--alpha", too_many, "--out", str(out)]) == 2
  assert f"{run.hp.experts.num_experts} non-negative weights" in capsys.readouterr().err


@pytest.mark.parametrize("masks", ["influence", "random", "circuit"])
def test_mask_strategy_runs_resume_exactly_and_keep_their_budget(base, tmp_path, masks):
  """Strategies in place of learned gates: masks are params the optimiser never moves, each
  expert meets the budget exactly once the schedule ends, and a resumed run is bit-identical
  (the strategy's state is checkpointed; circuits are rediscovered every 2 steps, so the cut
  falls between two rediscoveries)."""
  config = config_lib.load("smat_glyphs:smoke", [
      *base, f"--config.experts.masks={masks}", "--config.sparsity.start=0.25",
      "--config.sparsity.end=0.75", "--config.sparsity.window=1", "--config.train.epochs=3",
      "--config.sparsity.every=2", "--config.sparsity.group_size=8"])
  whole = metatrain.train_and_evaluate(config, str(tmp_path / "whole"), progress=False)
  assert whole["stopped_at"] == 6
  metatrain.train_and_evaluate(config, str(tmp_path / "cut"), stop_after=3, progress=False)
  metatrain.train_and_evaluate(config, str(tmp_path / "cut"), progress=False)
  final = _saved(config, tmp_path / "whole")
  _assert_same_checkpoint(final, _saved(config, tmp_path / "cut"))

  state = final.state
  assert "gates" not in state.params and "lam" not in state.params
  theta_pre = metatrain.setup(config)[0]
  kept = sparsity.kept_count(theta_pre, 1.0 - config.experts.target_sparsity)
  masks_now = jax.tree.leaves(state.params["masks"])
  for k in range(config.experts.num_experts):
    assert sum(int((m[k] != 0).sum()) for m in masks_now) == kept
    assert all(set(np.unique(m[k])) <= {0.0, 1.0} for m in masks_now)
  if masks == "random":  # fixed from the start: the masks of step 0 are the final ones
    initial = metatrain.setup(config)[3].params["masks"]
    chex.assert_trees_all_equal(initial, state.params["masks"])
  rows = [r for r in _train_rows(tmp_path / "whole")]
  assert rows[-1]["mean_expert_sparsity"] == pytest.approx(config.experts.target_sparsity,
                                                           abs=1e-4)
  run = metatrain.load_run(str(tmp_path / "whole"))  # meta-test reads the same masks
  assert "masks" in run.params
