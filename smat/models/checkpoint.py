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

_META = "backbone.json"


def save(directory: str, params: dict, config: vit.ViTConfig, **provenance) -> None:
  """Write a backbone directory atomically (to `<dir>.tmp`, then rename)."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(tmp, "params"), jax.tree.map(np.asarray, params))
  meta = {"config": dataclasses.asdict(config), **provenance}
  with open(os.path.join(tmp, _META), "w") as f:
    json.dump(meta, f, indent=2, default=str)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)


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
    return convert.import_safetensors(path, fmt, config), config
  meta_path = os.path.join(path, _META)
  if not os.path.isfile(meta_path):
    raise SmatError(f"{path}: not a backbone directory (no {_META}) and not a .safetensors "
                    f"file; create one with `smat import-backbone` or `smat pretrain`")
  with open(meta_path) as f:
    config = _config_from_json(json.load(f), meta_path).replace(**overrides)
  import orbax.checkpoint as ocp

  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), vit.param_shapes(config))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(os.path.abspath(path), "params"), target)
  return params, config


def _preset(arch: str, overrides: dict) -> vit.ViTConfig:
  try:
    return vit.get_config(arch, **overrides)
  except ValueError as e:
    raise SmatError(str(e)) from None


def load_from_config(backbone_config) -> tuple[dict, vit.ViTConfig]:
  """θ_pre named by a config's `backbone` section.

  Fields: `path` (a backbone directory, or a .safetensors file with `format` and `arch`), and
  the numerics switches `dtype` and `remat` (the architecture comes from the weights).
  """
  b = backbone_config
  if not b.get("path"):
    raise SmatError("config field backbone.path is empty: point it at a backbone directory "
                    "(smat pretrain / smat import-backbone) or a .safetensors file")
  fmt = b.get("format") or None
  arch = b.get("arch") or None
  numerics = {k: b[k] for k in ("dtype", "remat") if k in b}
  return load(b.path, fmt, arch, **numerics)
