"""Backbone checkpoints: a directory with `backbone.json` (architecture, provenance) and `params/`
(an orbax checkpoint of the parameter tree). Every command that needs θ_pre takes either such a
directory or a safetensors file plus its layout (`--format timm|hf --arch vit_s16|vit_b16`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from smat.errors import SmatError
from smat.models import convert, vit
from smat.models.layout import path_name  # also read from here by `smat.runs`

_META = "backbone.json"


def is_backbone(directory: str) -> bool:
  """Whether `directory` holds a backbone this project wrote (its `backbone.json`)."""
  return os.path.isfile(os.path.join(directory, _META))


def check_writable(directory: str, force: bool = False) -> None:
  """Refuse a destination that is neither absent, empty nor a backbone: a backbone directory is
  replaced, anything else is the user's and is never removed (unless `force`)."""
  if os.path.isfile(directory) or (os.path.exists(directory) and not os.path.isdir(directory)):
    raise SmatError(f"--out {directory}: is a file, not a directory; pick a directory path")
  if (os.path.isdir(directory) and os.listdir(directory) and not is_backbone(directory)
      and not force):
    raise SmatError(f"--out {directory}: a non-empty directory that is not a backbone (no "
                    f"{_META}); pick a new path, or pass --force to replace it")
  parent = os.path.dirname(os.path.abspath(directory))
  if not os.access(parent if os.path.isdir(parent) else "/", os.W_OK):
    raise SmatError(f"--out {directory}: {parent} is not writable; pick another path")


def check_weights(params: dict, where: str) -> None:
  """Every weight floating-point and finite: a NaN or Inf weight would give NaN features and
  chance accuracy that read like a result."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = path_name(path)
    value = np.asarray(leaf)
    if not convert._floating(value):
      raise SmatError(f"{where}: weight {name} has dtype {value.dtype}, expected floating point; "
                      f"the file does not hold trained weights")
    bad = value.size - int(np.isfinite(value.astype(np.float32)).sum())
    if bad:
      raise SmatError(f"{where}: weight {name} has {bad} non-finite value(s) (NaN/Inf) of "
                      f"{value.size}; the weights are broken, re-export them")


def save(directory: str, params: dict, config: vit.ViTConfig, force: bool = False,
         **provenance) -> None:
  """Write a backbone directory atomically: beside it (`<dir>.tmp`), then renamed into place.
  An existing backbone is replaced; any other non-empty directory is refused (`force` replaces
  it), so nothing the project did not write is deleted."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  check_writable(directory, force)
  check_weights(params, directory)
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of an interrupted save
  os.makedirs(tmp)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, "params"), jax.tree.map(np.asarray, params))
    meta = {"config": dataclasses.asdict(config), **provenance}
    with open(os.path.join(tmp, _META), "w") as f:
      json.dump(meta, f, indent=2, default=str)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if not os.path.exists(directory):
    os.replace(tmp, directory)
    return
  old = directory + ".old"
  shutil.rmtree(old, ignore_errors=True)
  os.replace(directory, old)  # the previous backbone stays whole until the new one is in place
  os.replace(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)


def _config_from_json(meta: dict, where: str) -> vit.ViTConfig:
  fields = {f.name for f in dataclasses.fields(vit.ViTConfig)}
  raw = meta.get("config", {})
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise SmatError(f"{where}: unknown config fields {unknown}; written by a newer smat?")
  raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
  try:
    return vit.ViTConfig(**raw)
  except (TypeError, ValueError) as e:
    raise SmatError(f"{where}: bad backbone config ({e})") from None


def load(path: str, fmt: str | None = None, arch: str | None = None,
         **overrides) -> tuple[dict, vit.ViTConfig]:
  """(params, config) from a backbone directory or a timm/HF safetensors file.

  `overrides` change numerics only (dtype, remat, layer_norm_eps for imports).
  """
  if path.endswith(".safetensors"):
    if fmt is None or arch is None:
      raise SmatError(f"{path}: a safetensors backbone needs its layout and architecture "
                      f"(--format {'|'.join(convert.FORMATS)} --arch "
                      f"{'|'.join(sorted(vit.PRESETS))})")
    overrides.setdefault("layer_norm_eps", convert.DEFAULT_LAYER_NORM_EPS.get(fmt, 1e-6))
    config = _preset(arch, overrides)
    params = convert.import_safetensors(path, fmt, config)
    check_weights(params, path)
    return params, config
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise SmatError(f"{path}: not a backbone directory (no {_META}) and not a .safetensors "
                    f"file; create one with `smat import-backbone` or `smat pretrain`")
  with open(meta_path) as f:
    config = _config_from_json(json.load(f), meta_path).replace(**overrides)
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), vit.param_shapes(config))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.join(os.path.abspath(path), "params"), target)
  except Exception as e:  # orbax/tensorstore raise many types for a truncated or missing file
    raise SmatError(f"{path}: backbone weights unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-create it with "
                    f"`smat import-backbone` or `smat pretrain`") from None
  check_weights(params, path)
  return params, config


def _preset(arch: str, overrides: dict) -> vit.ViTConfig:
  try:
    return vit.get_config(arch, **overrides)
  except ValueError as e:
    raise SmatError(str(e)) from None


def check_backbone_path(path: str) -> None:
  """A config's `backbone.path` names something that exists, or one line saying where it was
  looked for (relative paths are from the current directory) and which command makes it."""
  if not path:
    raise SmatError("config field backbone.path is empty: point it at a backbone directory "
                    "(smat pretrain / smat import-backbone) or a .safetensors file")
  if not os.path.exists(path):
    raise SmatError(f"config field backbone.path={path}: not found ({os.path.abspath(path)}; "
                    f"relative paths are from the current directory); {_make_backbone(path)}, "
                    f"or set --config.backbone.path=DIR")


def _make_backbone(path: str) -> str:
  """The command that writes a backbone at `path`: `<W>/pretrain/backbone` is the main job's
  (`smat reproduce --workdir W`), `<D>/backbone` that of `smat pretrain --workdir D`."""
  if path.endswith(".safetensors"):
    return "download the weights there (docs/backbones.md)"
  parent, name = os.path.split(os.path.normpath(path))
  workdir, stage = os.path.split(parent)
  if (stage, name) == ("pretrain", "backbone"):
    return (f"make it with `smat reproduce --workdir {workdir or '.'}` (the main job) or its "
            f"pre-training stage alone, `smat pretrain --config pretrain_glyphs --workdir "
            f"{parent}`")
  if name == "backbone":
    return f"make it with `smat pretrain --workdir {parent or '.'}`"
  return f"make it with `smat import-backbone --out {path}` or `smat pretrain --workdir DIR`"


def load_from_config(backbone_config) -> tuple[dict, vit.ViTConfig]:
  """θ_pre named by a config's `backbone` section.

  Fields: `path` (a backbone directory, or a .safetensors file with `format` and `arch`), and
  the numerics switches `dtype` and `remat` (the architecture comes from the weights).
  """
  b = backbone_config
  check_backbone_path(b.get("path", ""))
  fmt = b.get("format") or None
  arch = b.get("arch") or None
  numerics = {k: b[k] for k in ("dtype", "remat") if k in b}
  return load(b.path, fmt, arch, **numerics)
