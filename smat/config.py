"""Python config files (`<name>[.py][:arg]` or a path) with `--config.FIELD=VALUE` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`; `arg` selects
a variant such as `smoke`. The returned dict is locked, so a misspelt override is an error.

A config is named bare (`smat_glyphs`, `smat_glyphs.py`) for one packaged in `smat/configs/`,
found from any directory and in an installed wheel, or by a path to any file (an existing file
wins over a packaged name). Relative paths inside a config (`backbone.path`, `data_dir`) are
relative to the current directory, like `--workdir`.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from smat.errors import SmatError


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`spec` = 'name', 'name.py' or 'path/to/file.py', each with an optional ':arg';
  overrides = ['a.b=1', ...]."""
  path, _, arg = spec.partition(":")
  file = resolve(path)
  module_spec = importlib.util.spec_from_file_location(f"smat_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a file that is not a config: anything can go wrong in it
    raise SmatError(f"config {path}: not a config file, it fails to run "
                    f"({type(e).__name__}: {e})") from None
  if not callable(getattr(module, "get_config", None)):
    raise SmatError(f"config {path}: defines no get_config(arg=None); is it a config file?")
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError, TypeError) as e:  # e.g. an unknown variant after ':'
    raise SmatError(f"config {spec}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise SmatError(f"config {path}: get_config returned {type(config).__name__}, not a "
                    f"ConfigDict; is it a config file?")
  _add_missing(config)
  config.lock()
  for override in overrides:
    apply_override(config, override, path)
  return config


def packaged_names() -> list[str]:
  """Names of the configs shipped in `smat/configs/` (what a bare `--config NAME` finds)."""
  folder = importlib.resources.files("smat.configs")
  return sorted(f.name.removesuffix(".py") for f in folder.iterdir()
                if f.name.endswith(".py") and not f.name.startswith("_"))


def resolve(path: str) -> Path:
  """The config file `path` names: an existing file as given, else a bare name of a packaged
  config (`smat_glyphs` or `smat_glyphs.py`), so the shipped configs work from any directory."""
  file = Path(path)
  if file.is_file():
    if file.suffix != ".py":
      raise SmatError(f"config {path}: not a Python config file; give a .py file or a packaged "
                      f"config name ({', '.join(packaged_names())})")
    return file
  name = path.removesuffix(".py")
  if name and "/" not in path and "\\" not in path and name in packaged_names():
    return Path(str(importlib.resources.files("smat.configs") / f"{name}.py"))
  raise SmatError(f"config {path}: file not found and not a packaged config; give a file or one "
                  f"of {', '.join(packaged_names())}")


def _add_missing(config: ml_collections.ConfigDict) -> None:
  """Fields of a meta-training config that config files predating them lack
  (`smat.runs.TRAIN_DEFAULTS`), so that they can be overridden like any other."""
  if "method" in config and "train" in config and "experts" in config:
    from smat import runs

    for key, value in runs.TRAIN_DEFAULTS.items():
      if key not in config.train:
        config.train[key] = value


def sibling(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of another config file in the same directory (unlocked), so a config
  can be "that experiment, with this changed"."""
  file = Path(config_file).with_name(name)
  module_spec = importlib.util.spec_from_file_location(f"smat_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def from_json(path: str) -> ml_collections.ConfigDict:
  """A config saved by a run (`config.json`), locked like a loaded one. A meta-training run
  saved before a field existed gets that field's default (`smat.meta.defaults.base`)."""
  import json

  with open(path) as f:
    saved = json.load(f)
  if "method" in saved and "experts" in saved:
    from smat.meta import defaults

    if "test" not in saved.get("data", {}):  # saved before data.test: no default test set
      saved = {**saved, "data": {**saved.get("data", {}), "test": ""}}
    saved = _merged(defaults.base(saved["method"]).to_dict(), saved)
  config = ml_collections.ConfigDict(saved)
  _add_missing(config)
  config.lock()
  return config


def _merged(base: dict, saved: dict) -> dict:
  """`saved` with the keys only `base` has filled in (recursively)."""
  out = dict(base)
  for key, value in saved.items():
    out[key] = (_merged(base[key], value) if isinstance(value, dict)
                and isinstance(base.get(key), dict) else value)
  return out


def _parse(text: str, current):
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def override_key(override: str) -> str:
  """'a.b' of '--config.a.b=value'."""
  return override.removeprefix("--config.").removeprefix("config.").partition("=")[0]


def has_field(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether the dotted field `key` ('a.b') exists in `config`."""
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def apply_override(config: ml_collections.ConfigDict, override: str, where: str = "config") -> None:
  """'a.b=value' → config.a.b = value, parsed to the field's current type."""
  key, sep, text = override.removeprefix("--config.").removeprefix("config.").partition("=")
  if not sep:
    raise SmatError(f"override {override!r}: expected --config.FIELD=VALUE")
  node = config
  parts = key.split(".")
  for part in parts[:-1]:
    if part not in node:
      raise SmatError(f"{where}: no field {key!r} (known: {sorted(node.keys())})")
    node = node[part]
  leaf = parts[-1]
  if leaf not in node:
    raise SmatError(f"{where}: no field {key!r} (known at that level: {sorted(node.keys())})")
  value = _parse(text, node[leaf])
  try:
    node[leaf] = value
  except TypeError as e:
    raise SmatError(f"{where}: --config.{key}={text}: {e}") from None
