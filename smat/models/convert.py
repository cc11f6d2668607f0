"""DINO ViT weights in timm or Hugging Face layout (safetensors) → our parameter tree, and back
(`export`).

Only safetensors are read: the format holds tensors and nothing that can execute. Each layout is
a table from our parameter path to a source key and a converter (PyTorch `Linear` weights are
[out, in] and become [in, out] kernels; the patch convolution goes from [D, 3, p, p] to
[p, p, 3, D]; timm's fused `qkv` is split into query/key/value). Heads that a DINO backbone
does not use (timm `head`, Hugging Face `pooler`/`classifier`, `mask_token`) are skipped.
Everything else must match exactly: missing, unexpected and mis-shaped keys are all reported
together in one `WeightsError`.

LayerNorm epsilon differs between the layouts' reference implementations: DINO and timm use
1e-6; Hugging Face's `facebook/dino-vit*` configs use 1e-12. Each format's default is that of
its reference implementation, so imported weights reproduce its outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from smat.errors import SmatError
from smat.models import layout, vit

FORMATS = ("timm", "hf")
DEFAULT_LAYER_NORM_EPS = {"timm": 1e-6, "hf": 1e-12}
_IGNORED = {
    "timm": re.compile(r"^(head|head_dist|fc_norm)\.(weight|bias)$|^mask_token$"),
    "hf": re.compile(r"^(pooler\.dense|classifier)\.(weight|bias)$|^embeddings\.mask_token$"),
}


class WeightsError(SmatError):
  """A weight file does not fit the architecture; the message lists every offending key."""


def _linear(w):
  return np.ascontiguousarray(w.T)


def _conv(w):
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _same(w):
  return w


def _qkv_part(part: int, kind: str) -> Callable[[np.ndarray], np.ndarray]:
  """One of query/key/value out of timm's fused qkv weight [3D, D] or bias [3D]."""
  def take(w):
    third = w.shape[0] // 3
    piece = w[part * third:(part + 1) * third]
    return _linear(piece) if kind == "kernel" else piece
  take.qkv_part, take.kind = part, kind
  return take


def _inverse(fn: Callable) -> Callable[[np.ndarray], np.ndarray]:
  """Our array → the source layout's (for the qkv parts: the part, fused by `export`)."""
  if fn is _conv:
    return lambda w: np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
  if fn is _linear or getattr(fn, "kind", None) == "kernel":
    return _linear
  return _same


def _block_table(fmt: str) -> dict[str, tuple[str, Callable]]:
  """Our block path (under `blocks/`) → (source key with `{i}`, converter)."""
  table = {}
  if fmt == "timm":
    prefix = "blocks.{i}."
    names = {"norm1": "norm1", "norm2": "norm2", "attn/proj": "attn.proj",
             "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    table["ls1/gamma"] = (prefix + "ls1.gamma", _same)  # DINOv2's LayerScale
    table["ls2/gamma"] = (prefix + "ls2.gamma", _same)
    for part, qkv in enumerate(("query", "key", "value")):
      table[f"attn/{qkv}/kernel"] = (prefix + "attn.qkv.weight", _qkv_part(part, "kernel"))
      table[f"attn/{qkv}/bias"] = (prefix + "attn.qkv.bias", _qkv_part(part, "bias"))
  else:
    prefix = "encoder.layer.{i}."
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after",
             "attn/query": "attention.attention.query", "attn/key": "attention.attention.key",
             "attn/value": "attention.attention.value", "attn/proj": "attention.output.dense",
             "fc1": "intermediate.dense", "fc2": "output.dense"}
  for ours, theirs in names.items():
    if ours.startswith("norm"):
      table[f"{ours}/scale"] = (prefix + theirs + ".weight", _same)
    else:
      table[f"{ours}/kernel"] = (prefix + theirs + ".weight", _linear)
    table[f"{ours}/bias"] = (prefix + theirs + ".bias", _same)
  return table


def _top_table(fmt: str) -> dict[str, tuple[str, Callable]]:
  if fmt == "timm":
    return {"cls_token": ("cls_token", _same), "pos_embed": ("pos_embed", _same),
            "patch_embed/kernel": ("patch_embed.proj.weight", _conv),
            "patch_embed/bias": ("patch_embed.proj.bias", _same),
            "norm/scale": ("norm.weight", _same), "norm/bias": ("norm.bias", _same),
            "reg_token": ("reg_token", _same)}  # DINOv2 with registers only
  return {"cls_token": ("embeddings.cls_token", _same),
          "pos_embed": ("embeddings.position_embeddings", _same),
          "patch_embed/kernel": ("embeddings.patch_embeddings.projection.weight", _conv),
          "patch_embed/bias": ("embeddings.patch_embeddings.projection.bias", _same),
          "norm/scale": ("layernorm.weight", _same), "norm/bias": ("layernorm.bias", _same)}


def _flatten(tree, prefix=""):
  for name, value in tree.items():
    path = f"{prefix}{name}"
    if isinstance(value, dict):
      yield from _flatten(value, path + "/")
    else:
      yield path, value


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def convert(tensors: dict[str, np.ndarray], fmt: str, config: vit.ViTConfig,
            where: str = "weights") -> dict:
  """Source tensors → our parameter tree for `config`; raises WeightsError listing all problems."""
  if fmt not in FORMATS:
    raise WeightsError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")
  if fmt == "hf":  # ViTForImageClassification and friends prefix the backbone with `vit.`
    tensors = {k.removeprefix("vit."): v for k, v in tensors.items()}
  expected = dict(_flatten(vit.param_shapes(config)))
  used, missing, misshaped, mistyped, params = set(), [], [], [], {}
  top, block = _top_table(fmt), _block_table(fmt)
  if (config.layer_scale or config.registers) and fmt != "timm":
    raise WeightsError(f"{where}: DINOv2 backbones (LayerScale, registers) are read in timm's "
                       f"layout (timm's vit_*_patch14_dinov2 and *_reg4_dinov2, or DINOv2's own "
                       f"state dict without registers): use --format timm")
  for path, shape_dtype in expected.items():
    if layout.is_block(path):
      key, fn = block[layout.in_block(path)]
      keys = [key.format(i=i) for i in range(config.depth)]
    else:
      key, fn = top[path]
      keys = [key]
    present = [k for k in keys if k in tensors]
    used.update(present)
    missing.extend(k for k in keys if k not in tensors and k not in missing)
    if len(present) < len(keys):
      continue
    integral = [k for k in keys if not _floating(np.asarray(tensors[k]))]
    if integral:
      mistyped.extend(f"{k} {np.asarray(tensors[k]).dtype}" for k in integral)
      continue
    values = [fn(np.asarray(tensors[k], np.float32)) for k in keys]
    want = tuple(shape_dtype.shape[1:]) if layout.is_block(path) else tuple(shape_dtype.shape)
    wrong = [(k, v.shape) for k, v in zip(keys, values) if v.shape != want]
    for k, shape in wrong:
      misshaped.append(f"{k} {tuple(tensors[k].shape)} → {path} {shape}, expected {want}")
    if not wrong:
      _set(params, path, np.stack(values) if layout.is_block(path) else values[0])
  unexpected = sorted(k for k in tensors if k not in used and not _IGNORED[fmt].match(k))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {', '.join(sorted(missing))}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys ({len(misshaped)}): {'; '.join(misshaped)}")
  if mistyped:
    problems.append(f"non-floating keys ({len(mistyped)}), weights must be floating point: "
                    f"{', '.join(mistyped)}")
  if problems:
    raise WeightsError(
        f"{where} does not fit a {fmt}-layout ViT with width {config.width}, depth "
        f"{config.depth}, patch {config.patch_size}, {config.image_size} px:\n  "
        + "\n  ".join(problems)
        + "\n  (check --format and --arch; the file must hold the backbone's state dict)")
  return params


def export(params: dict, fmt: str = "timm") -> dict[str, np.ndarray]:
  """Our parameter tree → the state dict `convert` reads (float32, contiguous), so that timm's
  `VisionTransformer(num_classes=0)` or Hugging Face's `ViTModel` loads it: the inverse of
  `convert`, with timm's query/key/value fused back into one `qkv` (LayerScale backbones in
  timm's layout only, as they import)."""
  if fmt not in FORMATS:
    raise WeightsError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}")
  flat = {path: np.asarray(value, np.float32) for path, value in _flatten(params)}
  depth = flat[layout.block_path(layout.NORM1, "scale")].shape[0]
  out, fused = {}, {}
  for path, (key, fn) in _top_table(fmt).items():
    if path in flat:  # reg_token: DINOv2 with registers only
      out[key] = _inverse(fn)(flat[path])
  for path, (key, fn) in _block_table(fmt).items():
    if layout.block_path(path) not in flat:  # LayerScale, in DINOv2's backbones only
      continue
    for i in range(depth):
      value = _inverse(fn)(flat[layout.block_path(path)][i])
      if hasattr(fn, "qkv_part"):
        fused.setdefault(key.format(i=i), [None] * 3)[fn.qkv_part] = value
      else:
        out[key.format(i=i)] = value
  for key, parts in fused.items():
    out[key] = np.ascontiguousarray(np.concatenate(parts, axis=0))
  return out


def _floating(x) -> bool:
  """Floating point, bfloat16 included (numpy alone does not count it as floating)."""
  import jax.numpy as jnp

  return bool(jnp.issubdtype(x.dtype, jnp.floating))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as float32 numpy arrays (bf16/fp16 are upcast); integer
  tensors keep their dtype, so that `convert` refuses them instead of casting them silently."""
  from safetensors import safe_open  # imported here: only weight import needs it

  try:
    tensors = {}
    with safe_open(path, framework="flax") as f:
      for key in f.keys():
        value = f.get_tensor(key)
        floating = _floating(value)
        tensors[key] = np.asarray(value, dtype=np.float32) if floating else np.asarray(value)
    return tensors
  except FileNotFoundError:
    raise WeightsError(f"{path}: no such file") from None
  except Exception as e:  # safetensors raises its own error types for bad headers
    raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def import_safetensors(path: str, fmt: str, config: vit.ViTConfig) -> dict:
  return convert(read_safetensors(path), fmt, config, where=path)
