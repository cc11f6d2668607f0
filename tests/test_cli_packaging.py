"""The installed tool: packaged configs by bare name from any directory, overrides every command
either uses or refuses, `--version`, a `--help` that imports no JAX, and the wheel's contents."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from smat import cli
from smat import config as config_lib
from smat.errors import SmatError

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "numpy", "ml_collections", "grain",
         "tensorflow_datasets")


def run(args, capsys):
  code = cli.main([str(a) for a in args])
  out = capsys.readouterr()
  return code, out.out, out.err


def assert_one_line_error(code, err, *words):
  assert code == 2, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  for word in words:
    assert word in err, (word, err)


def smat(args, cwd, env=None):
  """`smat ARGS` as a new process in `cwd` (not the repository root)."""
  return subprocess.run([sys.executable, "-m", "smat.cli", *map(str, args)], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- packaged configs


def test_packaged_configs_load_by_bare_name_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  by_path = config_lib.load(f"{ROOT}/smat/configs/smat_glyphs.py:smoke")
  for spec in ("smat_glyphs:smoke", "smat_glyphs.py:smoke"):
    assert config_lib.load(spec).to_dict() == by_path.to_dict()
  assert config_lib.load("pmf_glyphs:smoke").method == "pmf"  # a sibling config, by name too
  assert config_lib.load("smat_glyphs:smoke").train.epochs < config_lib.load(
      "smat_glyphs").train.epochs
  assert {"glyphs_small", "pretrain_glyphs", "smat_glyphs", "smat_vits16_md"} <= set(
      config_lib.packaged_names())
  with pytest.raises(SmatError, match="smat_glyph: file not found and not a packaged config.*"
                                      "smat_glyphs"):
    config_lib.load("smat_glyph")
  with pytest.raises(SmatError, match="configs/smat_glyphs.py: file not found"):
    config_lib.load("configs/smat_glyphs.py")  # a path is a path: no fallback to the package


def test_a_file_in_the_current_directory_wins_over_a_packaged_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "smat_glyphs.py").write_text(
      "import ml_collections\n\ndef get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'mine': arg})\n")
  assert config_lib.load("smat_glyphs.py:x").mine == "x"
  assert "mine" not in config_lib.load("smat_glyphs")  # the bare name is the packaged one


def test_meta_train_from_another_directory_names_the_command_that_makes_the_backbone(tmp_path):
  done = smat(["meta-train", "--config", "smat_glyphs:smoke", "--workdir", "w"], tmp_path)
  assert done.returncode == 2, done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config field backbone.path=runs/demo/pretrain/backbone"), last
  assert str(tmp_path / "runs/demo/pretrain/backbone") in last
  assert "`smat reproduce --workdir runs/demo`" in last and "--config.backbone.path" in last
  assert not (tmp_path / "w").exists()  # checked before the workdir is made


def test_glyph_configs_read_the_backbone_the_main_job_writes():
  from smat import pipeline

  default = cli.build_parser().parse_args(["reproduce"]).workdir
  assert default == pipeline.DEFAULT_WORKDIR
  for name in ("smat_glyphs", "pmf_glyphs", "softmerge_glyphs", "smat_offline", "pmf_offline",
               "softmerge_offline"):
    assert config_lib.load(name).backbone.path == f"{default}/pretrain/backbone", name


def test_offline_configs_are_one_recipe_on_the_benchmark_the_main_job_compares_on():
  from smat import pipeline

  bench = pipeline.BENCHMARKS["offline"]
  smat = config_lib.load("smat_offline").to_dict()
  assert smat["data"]["train"].split(",") == list(bench.id_specs) == smat["data"]["val"].split(",")
  assert smat["data"]["test"].split(",") == list(bench.eval_specs)
  for method in ("pmf", "softmerge"):
    other = config_lib.load(f"{method}_offline").to_dict()
    assert other.pop("method") == method and {**smat, "method": None} == {**other,
                                                                            "method": None}
  assert {m: config_lib.load(p).method for m, p in bench.meta_configs.items()} == {
      "pmf": "pmf", "softmerge": "softmerge", "smat": "smat"}
  # The pre-training pool is classes no task draws from.
  pretrain = config_lib.load("pretrain_glyphs")
  assert (pretrain.data.pool or pretrain.data.train) in bench.id_specs
  assert pretrain.data.pool_split == "pool"


# ----------------------------------------------------------------------------- overrides


def test_both_override_forms_as_in_config_flags():
  rest, overrides = cli.split_overrides(
      ["meta-train", "--config.train.epochs", "3", "--workdir", "w", "--config.seed=2",
       "--config.optim.delta_lr", "-1e-3", "--config", "smat_glyphs:smoke"])
  assert rest == ["meta-train", "--workdir", "w", "--config", "smat_glyphs:smoke"]
  assert overrides == ["--config.train.epochs=3", "--config.seed=2",
                       "--config.optim.delta_lr=-1e-3"]
  loaded = config_lib.load("smat_glyphs:smoke", overrides)
  assert (loaded.train.epochs, loaded.seed, loaded.optim.delta_lr) == (3, 2, -1e-3)
  for argv in (["--config.seed"], ["--config.seed", "--workdir", "w"]):
    with pytest.raises(SmatError, match="--config.seed: no value"):
      cli.split_overrides(argv)


@pytest.mark.parametrize("args", [
    ["evaluate", "--workdir", "w", "--domains", "glyphs:id", "--out", "r.json"],
    ["plot", "--workdir", "w", "--out", "figs"],
    ["data", "describe", "glyphs:id"],
    ["import-backbone", "--format", "timm", "--arch", "vit_s16", "--weights", "x.safetensors",
     "--out", "bb"],
    ["embed", "--backbone", "bb", "--images", "imgs", "--out", "f.npz"],
])
def test_an_override_a_command_cannot_use_exits_2_naming_it(args, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  command = " ".join(args[:2] if args[0] == "data" else args[:1])
  for override in (["--config.seed=1"], ["--config.seed", "1"]):
    code, _, err = run([*args, *override], capsys)
    assert_one_line_error(code, err, "--config.seed=1", f"`smat {command}`")
  assert not any(tmp_path.iterdir())


def test_a_missing_override_value_exits_2(capsys):
  code, _, err = run(["meta-train", "--workdir", "w", "--config.train.epochs"], capsys)
  assert_one_line_error(code, err, "--config.train.epochs", "no value")


@pytest.mark.parametrize("override, words", [
    ("--config.train.epoch=1", ["--config.train.epoch", "no config of `smat reproduce`"]),
    ("--config.backbone.path=x", ["--config.backbone.path", "--workdir"]),
    ("--config.data_dir=x", ["--config.data_dir", "--data-dir"]),
    ("--config.eval.domains=glyphs:id", ["--config.eval.domains", "sets this field itself"]),
    ("--config.train.epochs=two", ["train.epochs=two"]),
])
def test_reproduce_refuses_an_override_no_stage_can_use(override, words, tmp_path, capsys):
  code, _, err = run(["reproduce", "--workdir", tmp_path / "demo", override], capsys)
  assert_one_line_error(code, err, *words)
  assert not (tmp_path / "demo").exists()  # before any stage runs


def test_the_long_variant_triples_the_tasks_and_the_schedules_that_count_them():
  base = config_lib.load("smat_offline").to_dict()
  long = config_lib.load("smat_offline:long").to_dict()
  tasks = lambda c: c["train"]["epochs"] * c["train"]["episodes_per_epoch"]
  assert tasks(base) == 800 and tasks(long) == 2400
  assert long["train"]["epochs"] == 20 and long["train"]["episodes_per_epoch"] == 120
  assert long["router"]["temperature_decay_tasks"] == 3 * 180.0  # T_sel's floor at 2430 tasks
  changed = {("train", "episodes_per_epoch"), ("router", "temperature_decay_tasks")}
  for group, fields in base.items():  # nothing else moves
    for field, value in (fields.items() if isinstance(fields, dict) else ()):
      if (group, field) not in changed:
        assert long[group][field] == value, (group, field)
  assert config_lib.load("pmf_offline:long").train.episodes_per_epoch == 120


def test_scale_length_keeps_the_schedule_in_step_with_fewer_epochs():
  from smat.meta import defaults

  c = config_lib.load("smat_offline")
  defaults.scale_length(c, tasks=0.3, epochs=0.5)  # 240 tasks over 10 epochs
  assert (c.train.epochs, c.train.episodes_per_epoch) == (10, 24)
  assert (c.optim.warmup_epochs, c.optim.cosine_epochs) == (2, 20)
  assert c.router.temperature_decay_tasks == pytest.approx(54.0)
  defaults.scale_length(c, tasks=0.01)  # never under one meta-batch per epoch
  assert c.train.episodes_per_epoch == c.data.meta_batch_size


def test_reproduce_sends_each_override_to_the_stages_that_have_its_field():
  from smat import pipeline

  paths = {"episodes": "glyphs_small", "pretrain": "pretrain_glyphs", "smat": "smat_glyphs"}
  configs = pipeline.stage_configs(paths, ["--config.seed=5", "--config.train.epochs=1",
                                           "--config.pretrain.steps=7"])
  assert [configs[s].seed for s in paths] == [5, 5, 5]
  assert configs["smat"].train.epochs == 1 and configs["pretrain"].pretrain.steps == 7


# ----------------------------------------------------------------------------- --version, --help


def test_version_is_pyproject_version(tmp_path):
  version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
  done = smat(["--version"], tmp_path)
  assert done.returncode == 0 and done.stdout.strip() == f"smat {version}", done


_HELP_IMPORTS = """
import contextlib, io, sys
from smat import cli
for args in (["--help"], *([c, "--help"] for c in sys.argv[1:])):
  with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(args)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_help_imports_no_jax(tmp_path):
  commands = ["reproduce", "data", "pretrain", "meta-train", "evaluate", "plot",
              "import-backbone", "embed"]
  done = subprocess.run([sys.executable, "-c", _HELP_IMPORTS, *commands], cwd=tmp_path,
                        capture_output=True, text=True, check=True)
  loaded = set(done.stdout.split())
  assert "smat" in loaded and not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_choices_spelt_out_in_the_cli_match_the_library():
  from smat.models import convert, vit

  assert cli.FORMATS == convert.FORMATS and cli.ARCHS == tuple(sorted(vit.PRESETS))


# ----------------------------------------------------------------------------- the wheel


def build_wheel(tmp_path) -> Path:
  """The project's wheel, built from a copy: setuptools builds in the source tree, and a stale
  build/ there would leak removed files into the wheel (and runs/ may hold gigabytes)."""
  source = tmp_path / "src"
  shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
  build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(source),
                          "-w", str(tmp_path / "dist")], capture_output=True, text=True,
                         timeout=300)
  assert build.returncode == 0, build.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("smat-*.whl")
  return wheel


def test_the_wheel_ships_configs_splits_and_license_and_runs_from_another_directory(tmp_path):
  wheel = build_wheel(tmp_path)
  names = zipfile.ZipFile(wheel).namelist()
  for name in ("smat_glyphs", "pmf_glyphs", "pretrain_glyphs", "glyphs_small", "smat_vits16_md"):
    assert f"smat/configs/{name}.py" in names, name
  assert "smat/data/splits/cifar_fs.json" in names  # the packaged class lists
  assert any(re.fullmatch(r"smat-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
  zipfile.ZipFile(wheel).extractall(tmp_path / "site")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
  where = subprocess.run([sys.executable, "-c", "import smat; print(smat.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(tmp_path / "site")), where.stdout  # the wheel's copy
  done = smat(["meta-train", "--config", "pmf_glyphs:smoke", "--workdir", "w"], elsewhere, env)
  assert done.returncode == 2 and "backbone.path=runs/demo/pretrain/backbone" in done.stderr, (
      done.stderr[-2000:])


def test_the_wheel_installed_in_a_fresh_venv_meta_trains_from_another_directory(
    tmp_path, glyphs_data_dir):
  """pip install of the wheel into a new virtual environment (its dependencies borrowed from
  this one's site-packages, smat itself not), then the installed `smat` script meta-trains a
  packaged smoke config in a directory that is not the repository."""
  import sysconfig

  import jax

  from smat.models import checkpoint, vit

  wheel = build_wheel(tmp_path)
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  purelib = Path(subprocess.run(
      [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True, text=True, check=True).stdout.strip())
  # A plain path, not a site dir: the editable smat's .pth files there are not processed.
  (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                            "install", "-q", "--no-deps", "--no-index", str(wheel)],
                           capture_output=True, text=True, timeout=300)
  assert install.returncode == 0, install.stderr[-2000:]
  data_dir, _, _ = glyphs_data_dir
  config = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
  checkpoint.save(str(tmp_path / "backbone"), vit.init(config, jax.random.key(0)), config)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  where = subprocess.run([str(venv / "bin" / "python"), "-c", "import smat; print(smat.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  assert where.stdout.startswith(str(purelib)), where.stdout  # the installed copy, not the tree
  done = subprocess.run(
      [str(venv / "bin" / "smat"), "meta-train", "--config", "pmf_glyphs:smoke", "--workdir", "w",
       f"--config.data_dir={data_dir}", f"--config.backbone.path={tmp_path / 'backbone'}",
       "--config.data.image_size=16"], cwd=elsewhere, env=env, capture_output=True, text=True,
      timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (elsewhere / "w" / "checkpoints").is_dir() and (elsewhere / "w" / "validation.json").is_file()


# ----------------------------------------------------------------------------- optional parts


def test_extras_cover_the_optional_sources_and_a_gpu_install():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  extras = project["optional-dependencies"]
  assert sorted(extras["all"]) == sorted(extras["tfds"] + extras["h5"] + extras["icons"])
  assert extras["cuda12"] == ["jax[cuda12]"]
  core = " ".join(project["dependencies"])
  assert "tensorflow-datasets" not in core and "h5py" not in core and "resvg" not in core
  assert 'extras="all,test"' in (ROOT / "bootstrap.sh").read_text()  # README's commands get every source


def test_a_missing_optional_library_is_one_line_with_the_pip_command():
  from smat.errors import require

  with pytest.raises(SmatError) as info:
    require("not_installed_anywhere_xyz", "tfds", "tfds: domains")
  assert str(info.value) == ("tfds: domains needs not_installed_anywhere_xyz, which this install "
                             "lacks: pip install 'smat[tfds]' (or 'smat[all]')")
  assert require("json", "tfds", "x").dumps([1]) == "[1]"


def test_the_h5_variant_reads_meta_dataset_from_pmfs_files(monkeypatch):
  monkeypatch.setenv("SMAT_MD_H5_DIR", "/data/pmf_h5")
  config = config_lib.load("smat_vits16_md:h5")
  train = config.data.train.split(",")
  assert len(train) == 8 and all(s.startswith("md_h5:/data/pmf_h5:") for s in train)
  assert train[0] == "md_h5:/data/pmf_h5:ilsvrc_2012"
  test = config.data.test.split(",")
  assert len(test) == 10 and test[-2:] == ["md_h5:/data/pmf_h5:traffic_sign",
                                           "md_h5:/data/pmf_h5:mscoco"]
  assert config_lib.load("smat_vits16_md").data.test.startswith("tfds:meta_dataset/ilsvrc_2012")
  assert config_lib.load("smat_glyphs").data.test == "glyphs:id,glyphs:ood,fashion_mnist"


def test_a_run_saved_before_data_test_existed_has_no_default_test_set(tmp_path):
  import json

  saved = config_lib.load("pmf_glyphs:smoke").to_dict()
  del saved["data"]["test"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert config_lib.from_json(str(tmp_path / "config.json")).data.test == ""


def test_benchmarks_take_overrides_in_both_forms_and_refuse_unknown_flags():
  import argparse

  from benchmarks import report

  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="smat_glyphs")
  args, overrides = report.parse_args(parser, ["--config.train.epochs", "3", "--config", "x",
                                               "--config.seed=2"])
  assert args.config == "x" and overrides == ["--config.train.epochs=3", "--config.seed=2"]
  with pytest.raises(SystemExit):
    report.parse_args(parser, ["--nope", "1"])
