"""Failure paths: each bad input exits 2 with one `error:` line naming the file or field, no
traceback, nothing deleted, nothing reported as a result; corrupt and failed checkpoints recover.

Meta-training cases use PMF's `:smoke` config (2 epochs of 2 steps) on a one-block, 16-wide ViT;
a module-wide persistent compilation cache compiles its step once.
"""

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from smat import cli, embed, outputs, runs, training
from smat import config as config_lib
from smat import metatrain
from smat.errors import DataError, SmatError
from smat.models import checkpoint, convert, vit

FIXTURES = Path(__file__).parent / "fixtures" / "vit"
PMF = "pmf_glyphs:smoke"
CFG = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)


def run(args, capsys):
  code = cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return code, out.out, out.err


def assert_one_line_error(code, err, *words):
  """Exit 2, and stderr ends in one `error:` line (progress bars and warnings may precede it)."""
  assert code == 2, err
  assert "Traceback" not in err and err.endswith("\n"), err
  last = re.split(r"[\r\n]", err.rstrip("\n"))[-1]
  assert last.startswith("error: ") and err.count("error:") == 1, err
  for word in words:
    assert word in last, (word, err)


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def timm_tensors():
  from safetensors.numpy import load_file

  return load_file(str(FIXTURES / "timm.safetensors"))


def _steps(directory) -> list[int]:
  return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


# ----------------------------------------------------------------------------- data loss


def test_import_backbone_never_removes_what_it_did_not_write(tmp_path, capsys):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("two years of work")
  args = ["import-backbone", "--format", "timm", "--arch", "vit_s16", "--weights",
          FIXTURES / "timm.safetensors", "--out", mine]
  code, _, err = run(args, capsys)
  assert_one_line_error(code, err, str(mine), "not a backbone", "--force")
  assert (mine / "thesis.tex").read_text() == "two years of work"
  (tmp_path / "a_file").write_text("x")
  code, _, err = run([*args[:-1], tmp_path / "a_file"], capsys)
  assert_one_line_error(code, err, "is a file")
  assert (tmp_path / "a_file").read_text() == "x"


def test_a_backbone_is_replaced_atomically(tmp_path):
  params = vit.init(CFG, jax.random.key(0))
  target = tmp_path / "bb"
  checkpoint.save(str(target), params, CFG, source="first")
  checkpoint.save(str(target), jax.tree.map(lambda p: p + 1, params), CFG, source="second")
  assert json.loads((target / "backbone.json").read_text())["source"] == "second"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bb"]  # no .tmp / .old left
  loaded, _ = checkpoint.load(str(target))
  np.testing.assert_array_equal(loaded["cls_token"], np.asarray(params["cls_token"]) + 1)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes").write_text("x")
  checkpoint.save(str(other), params, CFG, force=True)  # --force: the user said so
  assert checkpoint.is_backbone(str(other)) and not (other / "notes").exists()


# ----------------------------------------------------------------------------- wrong numbers


@pytest.mark.parametrize("value, words", [(np.nan, ["non-finite", "cls_token"]),
                                          (np.inf, ["non-finite", "cls_token"])])
def test_non_finite_weights_are_refused_at_import(timm_tensors, tmp_path, capsys, value, words):
  from safetensors.numpy import save_file

  tensors = dict(timm_tensors)
  tensors["cls_token"] = np.full_like(tensors["cls_token"], value)
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  config = vit.ViTConfig(patch_size=8, width=48, depth=2, num_heads=3, mlp_dim=192,
                         image_size=32)
  params = convert.import_safetensors(str(tmp_path / "bad.safetensors"), "timm", config)
  with pytest.raises(SmatError, match="non-finite") as e:
    checkpoint.check_weights(params, "bad.safetensors")
  assert all(w in str(e.value) for w in words)
  with pytest.raises(SmatError, match="non-finite"):
    checkpoint.save(str(tmp_path / "out"), params, config)
  assert not (tmp_path / "out").exists()


def test_integer_weights_are_refused_not_cast(timm_tensors, tmp_path):
  from safetensors.numpy import save_file

  tensors = dict(timm_tensors)
  tensors["norm.bias"] = np.zeros(tensors["norm.bias"].shape, np.int32)
  save_file(tensors, str(tmp_path / "int.safetensors"))
  config = vit.ViTConfig(patch_size=8, width=48, depth=2, num_heads=3, mlp_dim=192,
                         image_size=32, layer_norm_eps=1e-6)
  with pytest.raises(convert.WeightsError, match=r"non-floating keys .*norm\.bias int32"):
    convert.import_safetensors(str(tmp_path / "int.safetensors"), "timm", config)


def test_a_backbone_directory_with_nan_weights_fails_at_load(tmp_path):
  import orbax.checkpoint as ocp

  params = jax.tree.map(np.asarray, vit.init(CFG, jax.random.key(0)))
  params["pos_embed"] = np.full_like(params["pos_embed"], np.nan)
  checkpoint.save(str(tmp_path / "bb"), vit.init(CFG, jax.random.key(0)), CFG)
  shutil.rmtree(tmp_path / "bb" / "params")  # as an older smat (or a bad disk) left it
  with ocp.StandardCheckpointer() as c:
    c.save(str(tmp_path / "bb" / "params"), params)
  with pytest.raises(SmatError, match=r"weight pos_embed has .* non-finite"):
    checkpoint.load(str(tmp_path / "bb"))
  shutil.rmtree(tmp_path / "bb" / "params" / "d", ignore_errors=True)
  for p in (tmp_path / "bb" / "params").rglob("*"):  # a truncated weights file
    if p.is_file() and p.stat().st_size > 100:
      p.write_bytes(p.read_bytes()[:10])
  with pytest.raises(SmatError, match="backbone weights unreadable"):
    checkpoint.load(str(tmp_path / "bb"))


def test_embed_refuses_non_finite_features(tmp_path):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  params = jax.tree.map(lambda p: p * np.float32(np.nan), vit.init(CFG, jax.random.key(0)))
  with pytest.raises(DataError, match=r"a\.png: non-finite features"):
    embed.embed_folder(params, CFG, str(tmp_path), progress=False)


def test_evaluate_refuses_non_finite_accuracy():
  from smat import evaluate

  good = {"accuracy": 50.0, "ci95": 1.0, "per_episode": [50.0]}
  evaluate.check_results({"glyphs:id": good})
  with pytest.raises(SmatError, match="glyphs:ood: non-finite accuracy"):
    evaluate.check_results({"glyphs:ood": {**good, "accuracy": float("nan")}})


EVAL_COUNTS = [
    (["--queries", "0"], "--queries 0"), (["--episodes", "0"], "--episodes 0"),
    (["--episodes", "-3"], "--episodes -3"), (["--seed", "-1"], "--seed -1"),
    (["--batch-size", "0"], "--batch-size 0"), (["--image-size", "0"], "--image-size 0"),
    (["--shots", "0"], "--shots 0"), (["--ways", "1"], "--ways 1"),
    (["--domains", ""], "no data SPEC"), (["--domains", " , "], "no data SPEC"),
]


@pytest.mark.parametrize("extra, words", EVAL_COUNTS)
def test_evaluate_counts_are_validated_up_front(extra, words, backbone, tmp_path, capsys):
  out = tmp_path / "r.json"
  args = ["evaluate", "--method", "pre", "--backbone", backbone, "--domains", "glyphs:ood",
          "--out", out]
  code, stdout, err = run([*args, *extra], capsys)
  assert_one_line_error(code, err, words)
  assert not out.exists() and "±" not in stdout


def test_show_and_embed_counts(backbone, tmp_path, capsys):
  code, _, err = run(["data", "show", "glyphs:ood", "--out", tmp_path / "x.png", "--index",
                      "-1"], capsys)
  assert_one_line_error(code, err, "--index -1")
  code, _, err = run(["embed", "--backbone", backbone, "--images", tmp_path, "--out",
                      tmp_path / "f.npz", "--batch-size", "0"], capsys)
  assert_one_line_error(code, err, "--batch-size 0")


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("out, words", [
    ("missing/r.json", ["does not exist"]), (".", ["is a directory"]),
    ("results", ["must end in .json"]), ("/proc/r.json", ["cannot write"]),
])
def test_evaluate_checks_out_before_any_work(out, words, backbone, tmp_path, capsys,
                                             monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("work before --out"))
  code, _, err = run(["evaluate", "--method", "pre", "--backbone", backbone, "--domains",
                      "glyphs:ood", "--out", out], capsys)
  assert_one_line_error(code, err, "--out", *words)


def test_a_full_disk_is_refused_before_any_work(backbone, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(outputs, "free_bytes", lambda directory: 0)
  code, _, err = run(["evaluate", "--method", "pre", "--backbone", backbone, "--domains",
                      "glyphs:ood", "--out", tmp_path / "r.json"], capsys)
  assert_one_line_error(code, err, "is full")
  code, _, err = run(["embed", "--backbone", backbone, "--images", tmp_path, "--out",
                      tmp_path / "f.npz"], capsys)
  assert_one_line_error(code, err, "is full")


def test_embed_and_show_need_a_file_name_with_its_extension(backbone, tmp_path, capsys):
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  for out, words in [(tmp_path / "features", "must end in .npz"), (tmp_path, "is a directory")]:
    code, _, err = run(["embed", "--backbone", backbone, "--images", tmp_path, "--out", out],
                       capsys)
    assert_one_line_error(code, err, *words.split(" | "))
  code, _, err = run(["data", "show", "glyphs:ood", "--out", tmp_path / "grid"], capsys)
  assert_one_line_error(code, err, "must end in .png")
  assert not (tmp_path / "features.npz").exists()


def test_results_are_written_atomically(glyphs_data_dir, backbone, tmp_path, capsys,
                                        monkeypatch):
  data_dir, _, _ = glyphs_data_dir
  out = tmp_path / "r.json"
  out.write_text("the previous result")
  real_dump = json.dump

  def dump_then_fail(obj, f, **kw):
    real_dump(obj, f, **kw)
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(json, "dump", dump_then_fail)
  code, stdout, err = run(["evaluate", "--method", "pre", "--backbone", backbone, "--domains",
                           "glyphs:ood", "--ways", "3", "--queries", "1", "--episodes", "2",
                           "--data-dir", data_dir, "--out", out], capsys)
  assert_one_line_error(code, err, "No space left", "nothing was written")
  assert "| glyphs:ood (OOD) |" in stdout  # the table is printed before the write
  assert out.read_text() == "the previous result"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


# ----------------------------------------------------------------------------- one-line errors


def test_decompression_bomb_is_a_corrupt_image_and_skip_corrupt_skips_it(tmp_path, capsys,
                                                                         monkeypatch):
  from smat.data.sources import folder

  for c in ("a", "b"):
    (tmp_path / "data" / c).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / c / "small.png")
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "data" / "a" / "bomb.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² > 2 × 1000: PIL refuses it
  spec = f"folder:{tmp_path / 'data'}"
  code, _, err = run(["data", "describe", spec], capsys)
  assert_one_line_error(code, err, "bomb.png", "pixel limit", "--skip-corrupt")
  domain = folder.load(str(tmp_path / "data"), skip_corrupt=True)
  assert domain.metadata["skipped_corrupt"] == 1
  assert cli.build_parser().parse_args(["evaluate", "--domains", spec, "--out", "r.json",
                                        "--skip-corrupt"]).skip_corrupt  # the error's advice
  with pytest.raises(DataError, match="bomb.png: unreadable image"):
    embed.load_image(str(tmp_path / "data" / "a" / "bomb.png"), 16)


def test_folder_and_embed_see_the_same_images(tmp_path):
  from smat.data.sources import folder

  root = tmp_path / "data"
  for name in ("cat/1.png", "cat/sub/2.png", "cat/._1.png", "dog/1.png", ".hidden/1.png",
               "dog/.cache/3.png"):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    if Path(name).name.startswith("._"):
      (root / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    else:
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name)
  os.symlink(root / "cat", root / "kitten")  # the same images under a second name
  domain = folder.load(str(root))
  classes = domain.classes("test")
  assert [c.name for c in classes] == ["cat", "dog"]
  assert [c.size for c in classes] == [2, 1]
  assert embed.image_paths(str(root)) == sorted(
      [os.path.join("cat", "1.png"), os.path.join("cat", "sub", "2.png"),
       os.path.join("dog", "1.png")])


@pytest.mark.parametrize("extra, words", [
    (["--config.method=smatt"], ["method='smatt'", "smat"]),
    (["--config.data.meta_batch_size=0"], ["data.meta_batch_size=0"]),
    (["--config.train.epochs=0"], ["train.epochs=0"]),
    (["--config.train.episodes_per_epoch=-5"], ["train.episodes_per_epoch=-5"]),
    (["--config.val.episodes=0"], ["val.episodes=0"]),
    (["--config.seed=-1"], ["seed=-1"]),
    (["--config.train.epochs"], ["--config.train.epochs", "FIELD=VALUE", "no value"]),
])
def test_meta_train_config_errors_are_one_line(extra, words, base, tmp_path, capsys):
  code, _, err = run(["meta-train", "--config", PMF, "--workdir", tmp_path / "w", *base, *extra],
                     capsys)
  assert_one_line_error(code, err, *words)
  assert not (tmp_path / "w").exists()


def test_config_files_that_are_not_configs(tmp_path, capsys):
  (tmp_path / "script.py").write_text("import sys\nprint('hello')\n")
  (tmp_path / "broken.py").write_text("def get_config(:\n")
  (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
  (tmp_path / "notes.txt").write_text("hello")
  cases = [(PMF.replace(":smoke", ":smok"), ["smok", "variant"]),
           (tmp_path / "script.py", ["no get_config"]),
           (tmp_path / "broken.py", ["SyntaxError"]), (tmp_path / "raises.py", ["boom"]),
           (tmp_path / "notes.txt", ["not a Python config"])]
  for config, words in cases:
    code, _, err = run(["meta-train", "--config", config, "--workdir", tmp_path / "w"], capsys)
    assert_one_line_error(code, err, str(config).partition(":")[0], *words)


def test_a_workdir_that_is_a_file_or_read_only(base, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  code, _, err = run(["meta-train", "--config", PMF, "--workdir", tmp_path / "file", *base],
                     capsys)
  assert_one_line_error(code, err, "is a file")
  code, _, err = run(["meta-train", "--config", PMF, "--workdir", "/proc/smat_run", *base],
                     capsys)
  assert_one_line_error(code, err, "/proc/smat_run", "cannot write")


# ----------------------------------------------------------------------------- meta-training


def _train(base, workdir, *extra, stop_after=None):
  config = config_lib.load(PMF, [*base, *extra])
  return metatrain.train_and_evaluate(config, str(workdir), stop_after=stop_after,
                                      progress=False)


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
  """A whole PMF smoke run (steps 2 and 4 checkpointed), copied by the tests that damage it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  summary = _train(base, workdir)
  assert summary["stopped_at"] == 4
  return workdir


def _saved_delta(base, workdir, which="checkpoints", step=None):
  config = config_lib.load(PMF, base)
  template = metatrain.setup(config)[3]
  manager = training.checkpoint_manager(str(Path(workdir) / which), 2)
  try:
    state, _, _ = metatrain.restore(manager, template, jax.random.key(0), step)
  finally:
    manager.close()
  return jax.device_get(state.params["delta"]), int(state.step)


def test_resume_with_a_changed_config_is_refused_and_safe_changes_recorded(base, finished,
                                                                           tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = (workdir / "config.json").read_text()
  with pytest.raises(SmatError, match=r"optim\.delta_lr: 0\.001 → 0\.5.*"
                                      r"experts\.num_experts|optim\.delta_lr") as e:
    _train(base, workdir, "--config.optim.delta_lr=0.5", "--config.experts.num_experts=3")
  assert "optim.delta_lr" in str(e.value) and "experts.num_experts" in str(e.value)
  assert "\n" not in str(e.value)
  assert (workdir / "config.json").read_text() == before
  summary = _train(base, workdir, "--config.train.epochs=3")  # extending the run is safe
  assert summary["stopped_at"] == 6
  assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 3
  (change,) = [json.loads(l) for l in (workdir / runs.CHANGES).read_text().splitlines()]
  assert change["changes"] == {"train.epochs": {"from": 2, "to": 3}}


def test_a_second_process_on_one_workdir_is_refused(base, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with runs.WorkdirLock(str(workdir)):
    with pytest.raises(SmatError, match=rf"another `smat meta-train` .*pid {os.getpid()} on "
                                        rf"host"):
      _train(base, workdir)
  assert not (workdir / "metrics.jsonl").exists()
  # A lock file left by a killed run (no flock held) is stale: taken over.
  (workdir / "lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "x"}))
  with runs.WorkdirLock(str(workdir)):
    assert json.loads((workdir / "lock").read_text())["pid"] == os.getpid()
  with runs.WorkdirLock(str(workdir), primary=False):  # other hosts of a multi-host run
    assert (workdir / "lock").read_text() == ""


def _truncate_arrays(step_dir: Path) -> None:
  files = [p for p in step_dir.rglob("*") if p.is_file() and "ocdbt" not in p.name
           and p.parent.name == "d"]
  assert files, list(step_dir.rglob("*"))
  for p in files:
    p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 3)])


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(base, finished,
                                                                          tmp_path, capfd):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  best_step = metatrain.find_checkpoint(str(finished))[1]
  _truncate_arrays(workdir / "checkpoints" / "4")
  summary = _train(base, workdir)
  err = capfd.readouterr().err
  assert "checkpoints/4 is unreadable" in err and "resuming from step 2" in err
  assert summary["stopped_at"] == 4
  assert _steps(workdir / "checkpoints") == [2, 4]
  assert (workdir / "checkpoints" / "corrupt-4").is_dir()  # kept for a look, not deleted
  delta, _ = _saved_delta(base, workdir)
  expected, _ = _saved_delta(base, finished)
  jax.tree.map(np.testing.assert_array_equal, delta, expected)  # the redone steps are the same
  assert metatrain.find_checkpoint(str(workdir))[1] == best_step  # the same best, redone
  metatrain.load_run(str(workdir))  # and it reads back


def test_checkpoints_of_another_run_shape_are_an_error_and_stay(base, finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished / "checkpoints", workdir / "checkpoints")  # no config.json with them
  config = config_lib.load("smat_glyphs:smoke", base)
  with pytest.raises(SmatError, match=r"no checkpoint reads back \(step 4: "):
    metatrain.train_and_evaluate(config, str(workdir), progress=False)
  assert _steps(workdir / "checkpoints") == [2, 4]  # nothing moved: not damage


def _as_legacy_run(workdir: Path, best: int) -> None:
  """The layout of runs written before one manager kept both: checkpoints/ saved without
  metrics, the best in best/<step> (with its validation accuracy as metrics)."""
  (workdir / "best").mkdir()
  shutil.copytree(workdir / "checkpoints" / str(best), workdir / "best" / str(best))
  for step in _steps(workdir / "checkpoints"):
    shutil.rmtree(workdir / "checkpoints" / str(step) / "metrics")


def test_a_run_from_before_one_manager_reads_its_best_from_best(base, finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  accuracy = {h["step"]: h["accuracy"] for h in json.loads((workdir / "validation.json")
                                                             .read_text())}
  worst = min(accuracy, key=lambda s: (accuracy[s], -s))  # not what the new layout would pick
  _as_legacy_run(workdir, worst)
  manager, step, where = metatrain.find_checkpoint(str(workdir))
  assert (step, where) == (worst, f"{workdir}/best/{worst}")
  assert manager.metrics(step) == {"val_accuracy": accuracy[worst]}
  run, latest = metatrain.load_run(str(workdir)), metatrain.load_run(str(finished), "checkpoints")
  assert run.tasks_seen * 4 == latest.tasks_seen * worst
  assert metatrain.find_checkpoint(str(workdir), "checkpoints")[1] == 4


def test_a_deleted_latest_checkpoint_with_a_newer_legacy_best_resumes(base, finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  _as_legacy_run(workdir, 4)
  shutil.rmtree(workdir / "checkpoints" / "4")
  # best/4 is a future the resume redoes: not the best until the run is back at step 4.
  assert metatrain.find_checkpoint(str(workdir), "checkpoints")[1] == 2
  with pytest.raises(SmatError, match="no validated checkpoint yet"):
    metatrain.find_checkpoint(str(workdir))
  summary = _train(base, workdir)
  assert summary["stopped_at"] == 4 and _steps(workdir / "checkpoints") == [2, 4]
  assert metatrain.find_checkpoint(str(workdir))[1] == 4  # redone: best/4 and checkpoints/4


def test_evaluate_on_a_corrupt_best_is_one_line(base, finished, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  step = metatrain.find_checkpoint(str(workdir))[1]
  _truncate_arrays(workdir / "checkpoints" / str(step))
  code, _, err = run(["evaluate", "--workdir", workdir, "--domains", "glyphs:ood", "--out",
                      tmp_path / "r.json"], capsys)
  assert_one_line_error(code, err, f"checkpoints/{step}", "checkpoint unreadable")


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(base, tmp_path,
                                                                            capsys, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  workdir = tmp_path / "run"
  _train(base, workdir, stop_after=2)
  assert _steps(workdir / "checkpoints") == [2]

  async def disk_full(self, *args, **kwargs):
    raise OSError(28, "No space left on device")

  for name in ("AtomicRenameTemporaryPath", "CommitFileTemporaryPath"):
    monkeypatch.setattr(getattr(atomicity, name), "finalize", disk_full)
  code, _, err = run(["meta-train", "--config", PMF, "--workdir", workdir, *base], capsys)
  assert_one_line_error(code, err, "writing a checkpoint", "No space left on device",
                        "the last intact checkpoint is step 2")
  monkeypatch.undo()
  assert _steps(workdir / "checkpoints") == [2]
  _, step = _saved_delta(base, workdir)
  assert step == 2
  summary = _train(base, workdir)  # space freed: the same command resumes
  assert summary["stopped_at"] == 4


def test_divergence_stops_before_an_exploded_delta_is_saved(base, tmp_path):
  workdir = tmp_path / "run"  # the run's epoch-1 checkpoint, then a lr that explodes δ
  _train(base, tmp_path / "first", stop_after=2)
  shutil.copytree(tmp_path / "first" / "checkpoints" / "2", workdir / "checkpoints" / "2")
  with pytest.raises(SmatError, match=r"diverged at step 3 \(.*max\|δ\| .* > "
                                      r"train\.max_delta=1000.*last good checkpoint is step 2"):
    _train(base, workdir, "--config.optim.delta_lr=1e30", "--config.optim.warmup_lr=1e30",
           "--config.optim.min_lr=1e30")
  assert _steps(workdir / "checkpoints") == [2] and not (workdir / "best").exists()
  delta, _ = _saved_delta(base, workdir)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(delta)) < 1e3


class _Manager:
  def __init__(self, step):
    self.step = step

  def latest_step(self):
    return self.step


def test_after_a_divergence_warning_a_validation_at_chance_is_not_promoted(capsys):
  import ml_collections

  config = ml_collections.ConfigDict({"train": {"max_loss": 1e4, "max_delta": 1e3},
                                      "data": {"sampler": "fixed", "ways": 5}})
  guard = runs.DivergenceGuard(config, _Manager(10), "w")
  delta = {"delta": {"w": np.full(3, 0.5, np.float32)}}
  guard.check({"loss": 1.2}, delta, 11)
  assert guard.promote({"accuracy": 20.0, "ci95": 2.0}, 12)  # at chance, but no warning: kept
  guard.check({"loss": 1.5}, {"delta": {"w": np.full(3, 400.0, np.float32)}}, 13)
  assert "max|δ| 400 near the divergence limits" in capsys.readouterr().err
  assert not guard.promote({"accuracy": 21.0, "ci95": 2.0}, 14)
  err = capsys.readouterr().err
  assert "step 14 is at chance" in err and "step 10, is the good one" in err
  assert guard.promote({"accuracy": 60.0, "ci95": 2.0}, 16)  # recovered: a real result
  with pytest.raises(SmatError, match="validation at step 18 is non-finite.*step 10"):
    guard.promote({"accuracy": float("nan"), "ci95": 0.0}, 18)
  with pytest.raises(SmatError, match=r"diverged at step 19 \(loss 2e\+04 > train\.max_loss.*"
                                      r"before the divergence warning at step 13 is step 10"):
    guard.check({"loss": 2e4}, delta, 19)


def test_a_pretrain_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  code, _, err = run(["pretrain", "--workdir", tmp_path / "file"], capsys)
  assert_one_line_error(code, err, "is a file")
  assert (tmp_path / "file").read_text() == "x"


def test_prepare_counts(capsys):
  for flag in ("--size", "--instances", "--workers"):
    code, _, err = run(["data", "prepare", "glyphs", flag, "0"], capsys)
    assert_one_line_error(code, err, f"{flag} 0")


def test_a_run_saved_before_the_guard_fields_resumes_without_a_difference(tmp_path):
  import ml_collections

  config = config_lib.load(PMF, ["--config.data.image_size=16"])
  old = json.loads(config.to_json_best_effort())
  for key in runs.TRAIN_DEFAULTS:
    del old["train"][key]
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  runs.record_config(str(tmp_path), config.to_json_best_effort(indent=1))
  assert not (tmp_path / runs.CHANGES).exists()
  assert isinstance(config_lib.from_json(str(tmp_path / "config.json")), ml_collections.ConfigDict)


def test_a_full_disk_mid_run_is_one_line(monkeypatch, capsys):
  from smat.data import spec

  def full(*args, **kwargs):  # as MetricsLog.write or a figure's save would raise
    raise OSError(28, "No space left on device", "/runs/x/metrics.jsonl")

  monkeypatch.setattr(spec, "load_domains", full)
  code, _, err = run(["data", "describe", "glyphs:id"], capsys)
  assert_one_line_error(code, err, "/runs/x/metrics.jsonl: No space left on device")
  monkeypatch.setattr(spec, "load_domains", lambda *a, **k: [][1])  # a bug stays a traceback
  with pytest.raises(IndexError):
    cli.main(["data", "describe", "glyphs:id"])


def test_evaluate_of_overflowing_features_is_an_error_not_chance(glyphs_data_dir, tmp_path,
                                                                 capsys):
  data_dir, _, _ = glyphs_data_dir
  huge = tmp_path / "huge"  # finite weights whose features overflow to Inf/NaN
  checkpoint.save(str(huge), jax.tree.map(lambda p: p * 1e30, vit.init(CFG, jax.random.key(0))),
                  CFG)
  out = tmp_path / "r.json"
  for route in ("2", "40"):  # per-episode embedding, and the cached feature table
    code, stdout, err = run(["evaluate", "--method", "pre", "--backbone", huge, "--domains",
                             "glyphs:ood", "--ways", "3", "--queries", "1", "--episodes", route,
                             "--lr-search-episodes", "1", "--data-dir", data_dir, "--out", out],
                            capsys)
    assert_one_line_error(code, err, "glyphs:ood: non-finite accuracy")
    assert not out.exists() and "±" not in stdout
