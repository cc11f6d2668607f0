"""The ViT's layout in one place: the names and kinds of its parameters, and its pieces as pure
functions of them.

`vit.VisionTransformer` owns the parameters (its Flax modules take their names from here); the
modules that read the tree by name — gates per leaf kind (`smat.meta.experts`), per-block budgets
(`smat.sparsity.budgeted`), figures (`smat.plots`), circuit slices and compression — ask here:

  patch_embed/{kernel [p, p, 3, D], bias}   cls_token [1, 1, D]   norm/{scale, bias}
  pos_embed [1, 1 + N², D], or [1, N², D] with registers        reg_token [1, R, D]
  blocks/<kind>/<leaf> [L, ...], one row per layer; kinds attn/query, attn/key, attn/value,
      attn/proj, fc1, fc2 ({kernel [L, in, out], bias}), norm1, norm2 ({scale, bias}), and
      ls1, ls2 ({gamma}, LayerScale only)

The pieces (`embed`, `layer_norm`, `attention`, `mlp`, `block`) compute what the Flax module does
in float32, on one layer's tree `layer(params["blocks"], l)` or a pruned copy of it with fewer
heads and hidden units. The circuit forward needs each node's input and output: attention and MLP
read the stream [B, T, D], or one copy of it per node [N, B, T, D] (node n, a head or a group of
hidden units, reads copy n only), and hand their units [B, T, N, s] (heads' outputs, groups of
hidden units) to a `write` hook: `merged` is the layer's output, `per_node` each node's write.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = "blocks"
ATTN = "attn"
QKV = ("query", "key", "value")
PROJ = "proj"
FC1, FC2 = "fc1", "fc2"
NORM1, NORM2 = "norm1", "norm2"
LAYER_SCALES = ("ls1", "ls2")  # DINOv2's LayerScale of the attention and MLP branches
PATCH_EMBED, CLS_TOKEN, POS_EMBED, REG_TOKEN = "patch_embed", "cls_token", "pos_embed", "reg_token"
FINAL_NORM = "norm"
EMBEDDINGS = (PATCH_EMBED, CLS_TOKEN, POS_EMBED, REG_TOKEN)
BLOCK_KINDS = (*(f"{ATTN}/{name}" for name in (*QKV, PROJ)), FC1, FC2, NORM1, NORM2)
EMBEDDING_KIND, FINAL_NORM_KIND = "embeddings", "final norm"  # the kinds of the other leaves


# ----------------------------------------------------------------------------------------------
# Names.

def path_name(path) -> str:
  """'blocks/attn/query/kernel' for a pytree key path (jax.tree_util.keystr's `simple` and
  `separator` arguments are newer than the JAX versions supported)."""
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def named_leaves(tree) -> list[tuple[str, object]]:
  """(path name, leaf) in the tree's flatten order."""
  return [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def block_path(*parts: str) -> str:
  """The name of a block leaf: block_path("attn", "proj", "kernel") = 'blocks/attn/proj/kernel'."""
  return "/".join((BLOCKS, *parts))


def is_block(name: str) -> bool:
  """Whether the leaf is stacked over layers ([L, ...])."""
  return name.startswith(BLOCKS + "/")


def in_block(name: str) -> str:
  """A block leaf's path inside one block: 'attn/query/kernel'."""
  return name.removeprefix(BLOCKS + "/")


def is_embedding(name: str) -> bool:
  return name.split("/")[0] in EMBEDDINGS


def is_kernel(name: str) -> bool:
  return name.endswith("kernel")


def kind(name: str) -> str:
  """The module a leaf belongs to, kernel and bias together: a block kind ('attn/query', 'fc1',
  'norm1', …), `EMBEDDING_KIND` or `FINAL_NORM_KIND`."""
  if is_block(name):
    return in_block(name).rsplit("/", 1)[0]
  return EMBEDDING_KIND if is_embedding(name) else FINAL_NORM_KIND


def layer_count(name: str, shape: tuple[int, ...]) -> int:
  """How many layers the leaf holds rows for: L for block leaves, 1 for the others."""
  return shape[0] if is_block(name) else 1


def depth(tree) -> int:
  """L, from the tree's block leaves (0 without any)."""
  return max([leaf.shape[0] for name, leaf in named_leaves(tree) if is_block(name)], default=0)


def layer(blocks, l: int):
  """Layer l's tree (`norm1`, `attn`, …) of the stacked `params["blocks"]`."""
  return jax.tree.map(lambda a: a[l], blocks)


def require_plain_blocks(config, what: str) -> None:
  """The pieces below know DINO's blocks and tokens, not LayerScale's or registers': refuse
  rather than compute a different network."""
  if config.layer_scale or config.registers:
    from smat.errors import SmatError

    raise SmatError(f"{what} supports DINO's ViT, not DINOv2's LayerScale or registers; "
                    f"use a learned or another hand-designed mask strategy")


# ----------------------------------------------------------------------------------------------
# Embeddings.

def cubic_resize_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """[out, in] weights of PyTorch's bicubic resize (a = −0.75, align_corners=False).

  `scale` is the factor PyTorch maps coordinates with (source = (dst + ½) / scale − ½); taps
  beyond the border are clamped to the edge, as PyTorch does.
  """
  a = -0.75

  def near(x):  # |x| ≤ 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.zeros((out_size, in_size), np.float64)
  for dst in range(out_size):
    src = (dst + 0.5) / scale - 0.5
    base = math.floor(src)
    t = src - base
    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for offset, w in zip(range(-1, 3), taps):
      weights[dst, min(max(base + offset, 0), in_size - 1)] += w
  return weights.astype(np.float32)


def resample_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int,
                       prefix: int = 1) -> jax.Array:
  """DINO's `interpolate_pos_encoding`: [1, prefix + N², D] → [1, prefix + grid_h·grid_w, D];
  the `prefix` rows (CLS's; none with registers) are kept as they are."""
  n = math.isqrt(pos_embed.shape[1] - prefix)
  if (grid_h, grid_w) == (n, n):
    return pos_embed
  rows = jnp.asarray(cubic_resize_matrix(n, grid_h, (grid_h + 0.1) / n))
  cols = jnp.asarray(cubic_resize_matrix(n, grid_w, (grid_w + 0.1) / n))
  patches = pos_embed[0, prefix:].reshape(n, n, -1)
  resized = jnp.einsum("hi,ijd,wj->hwd", rows, patches, cols,
                       precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:, :prefix], resized.reshape(1, grid_h * grid_w, -1)], axis=1)


def tokens(patches, cls_token, pos_embed, registers=None, dtype=None) -> jax.Array:
  """Patch embeddings [B, h, w, D] → the stream entering block 0 [B, 1 (+ R) + h·w, D]: CLS (and
  register) tokens prepended, position embeddings resampled to h × w added (with registers, to
  the patches only: timm's no_embed_class)."""
  dtype = patches.dtype if dtype is None else dtype
  batch, grid_h, grid_w, width = patches.shape
  x = patches.reshape(batch, grid_h * grid_w, width)
  prefix = lambda t: jnp.broadcast_to(t, (batch, *t.shape[1:])).astype(dtype)
  if registers is None:
    x = jnp.concatenate([prefix(cls_token), x], axis=1)
    return x + resample_pos_embed(pos_embed, grid_h, grid_w).astype(dtype)
  x = x + resample_pos_embed(pos_embed, grid_h, grid_w, prefix=0).astype(dtype)
  return jnp.concatenate([prefix(cls_token), prefix(registers), x], axis=1)


def embed(params, images) -> jax.Array:
  """`tokens` of normalised images [B, H, W, 3] under `params`' patch convolution (stride = its
  kernel size)."""
  kernel = params[PATCH_EMBED]["kernel"]
  patches = jax.lax.conv_general_dilated(images, kernel, kernel.shape[:2], "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return tokens(patches + params[PATCH_EMBED]["bias"], params[CLS_TOKEN], params[POS_EMBED],
                params.get(REG_TOKEN))


# ----------------------------------------------------------------------------------------------
# Block pieces.

def gelu(x):
  """DINO's exact GELU, x · Φ(x), written as PyTorch computes it: ½x(1 + erf(x/√2)).
  `jax.nn.gelu(approximate=False)` uses erfc instead, whose XLA:CPU expansion made it the most
  expensive single op of a CPU forward (`benchmarks.cpu_profile`); the two agree to float32
  rounding (tested)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


def layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attend(q, k, v):
  """Softmax attention per head: q, k, v [B, T, H, dh] → [B, T, H, dh]. The softmax runs in
  float32 and the result has q's dtype (the compute dtype of `vit.ViTConfig`)."""
  q = q * np.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)  # [B, T, H, dh]: smaller than scores
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  weights = softmax(scores.astype(jnp.float32)).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@jax.custom_vjp
def softmax(scores):
  """Softmax over the last axis, with its backward written out (w ⊙ (g − Σ g ⊙ w)) from the
  saved weights alone: equal to `jax.nn.softmax` to float32 rounding (tested) and, on XLA:CPU,
  fewer passes over the [B, H, T, T] scores forward and backward (`benchmarks.cpu_profile`)."""
  return _softmax_fwd(scores)[0]


def _softmax_fwd(scores):
  e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  weights = e * (1.0 / e.sum(-1, keepdims=True))
  return weights, weights


def _softmax_bwd(weights, g):
  return (weights * (g - (g * weights).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def units(x, p, size: int | None = None) -> jax.Array:
  """A dense layer's outputs in nodes of `size` units (all in one node without): x [B, T, D]
  → [B, T, N, size]; from one copy of the input per node, x [N, B, T, D], node n reads x[n]."""
  kernel = p["kernel"]
  fan_in, fan_out = kernel.shape
  nodes, size = (1, fan_out) if size is None else (fan_out // size, size)
  kernel = kernel.reshape(fan_in, nodes, size)
  spec = "nbtd,dns->btns" if x.ndim == 4 else "btd,dns->btns"
  return jnp.einsum(spec, x, kernel) + p["bias"].reshape(kernel.shape[1:])


def merged(h, p) -> jax.Array:
  """Write hook of the plain forward: units [B, T, N, s] through dense `p`, bias included →
  [B, T, D]."""
  flat = h.reshape(*h.shape[:-2], h.shape[-2] * h.shape[-1])
  return flat @ p["kernel"] + p["bias"]


def per_node(h, p) -> jax.Array:
  """Write hook of the circuit forward: what each node's units [B, T, N, s] write through `p`'s
  rows, [N, B, T, D], without the bias (their sum + bias is `merged`)."""
  kernel = p["kernel"].reshape(*h.shape[-2:], p["kernel"].shape[-1])
  return jnp.einsum("btns,nsd->nbtd", h, kernel)


def attention(reads, p, head_dim: int, write=merged) -> jax.Array:
  """DINO's multi-head self-attention of one layer's `attn` tree `p` (H = query columns / dh).

  reads: what the query, key and value projections read (normalised), each [B, T, D] or per head
  [H, B, T, D]; `write` maps the heads' outputs [B, T, H, dh] through `proj`.
  """
  q, k, v = (units(x, p[name], head_dim) for x, name in zip(reads, QKV))
  return write(attend(q, k, v), p[PROJ])


def mlp(x, p, group_size: int | None = None, write=merged) -> jax.Array:
  """DINO's MLP (fc1 → exact GELU → fc2) of one layer's tree `p`: x [B, T, D] or per group
  [G, B, T, D] (normalised); `write` maps the hidden units, in groups of `group_size`, through
  fc2."""
  return write(gelu(units(x, p[FC1], group_size)), p[FC2])


def block(x, p, eps: float, head_dim: int) -> jax.Array:
  """One pre-LN block of DINO's ViT on the stream x [B, T, D]."""
  y = layer_norm(x, p[NORM1], eps)
  x = x + attention((y, y, y), p[ATTN], head_dim)
  return x + mlp(layer_norm(x, p[NORM2], eps), p)


def features(x, params, eps: float) -> jax.Array:
  """CLS features [B, D]: the final LayerNorm of the stream's first token."""
  return layer_norm(x, params[FINAL_NORM], eps)[:, 0]
