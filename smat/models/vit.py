"""The Vision Transformer of DINO (ViT-S/16, ViT-B/16) and small CPU presets, in Flax.

Architecture (DINO / timm `VisionTransformer`, no classifier head): 16×16 patch embedding
(a strided convolution with bias), a CLS token, learned absolute position embeddings, `depth`
pre-LN blocks (LayerNorm → multi-head self-attention with biased query/key/value → residual;
LayerNorm → MLP with exact GELU → residual), a final LayerNorm; the feature is the CLS token.

Parameters are a plain pytree with readable names, e.g. `blocks/attn/query/kernel` [depth, D, D]:
the blocks are stacked along a leading layer axis (one `nn.scan`), so per-layer analyses index
axis 0 and a config switch trades compile time for speed (`unroll_blocks`). `forward(params, images, config)`
is a pure function of the parameters, so SMAT evaluates θ_pre + m ⊙ δ by passing that tree.

When images have another size than the one the position embeddings were trained for, the patch
grid of the embeddings is resampled on the fly exactly as DINO does (bicubic, a = −0.75,
`scale_factor = (n + 0.1) / N`), so a delta on the position embeddings stays defined on the
original grid, as in the paper (224-px weights run at 128 px).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture and numerics of a ViT; hashable so it can be a static jit argument.

  `image_size` is the resolution the position embeddings are defined for; `dtype` is the
  compute dtype ("bfloat16" keeps float32 parameters, LayerNorm statistics and softmax);
  `remat` recomputes block activations in the backward pass instead of storing them.
  `unroll_blocks` unrolls the loop over the stacked blocks: ViT-S/16 fwd+bwd runs 1.7× faster
  on an H100 unrolled, and XLA's cost analysis counts a rolled loop body only once; a rolled
  loop (False) compiles in time independent of depth. `layer_scale` adds DINOv2's LayerScale:
  each residual branch is multiplied by a learned per-channel `gamma` (`ls1`, `ls2`).
  `registers` > 0 is DINOv2 with registers in timm's layout: that many learned tokens
  (`reg_token`) after CLS, and position embeddings for the patches only (CLS and registers
  carry none), so `pos_embed` is [1, N², D].
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  image_size: int
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: bool = False
  unroll_blocks: bool = True
  layer_scale: bool = False
  registers: int = 0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.registers < 0:
      raise ValueError(f"registers {self.registers} must be ≥ 0")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} must be 'float32' or 'bfloat16'")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  def replace(self, **changes) -> "ViTConfig":
    return dataclasses.replace(self, **changes)


# DINO's released backbones (224 px, LayerNorm eps 1e-6), and presets small enough for 2 CPU
# cores on the 32-px offline benchmark. Forward GFLOPs per image from XLA's cost analysis
# (`python -m benchmarks.backbone_throughput`): vit_mini_p4 0.121 and vit_tiny_p4 0.387 at 32 px,
# vit_s16 2.94 / 9.47 and vit_b16 11.4 / 35.7 at 128 / 224 px.
PRESETS: dict[str, ViTConfig] = {
    "vit_s16": ViTConfig(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536,
                         image_size=224),
    "vit_b16": ViTConfig(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                         image_size=224),
    "vit_tiny_p4": ViTConfig(patch_size=4, width=192, depth=6, num_heads=3, mlp_dim=768,
                             image_size=32),
    "vit_mini_p4": ViTConfig(patch_size=4, width=128, depth=4, num_heads=4, mlp_dim=512,
                             image_size=32),
    # DINOv2 (timm's vit_*_patch14_dinov2.lvd142m, without registers): 518-px position
    # embeddings (37 × 37 patches of 14 px) and LayerScale.
    "vit_s14_dinov2": ViTConfig(patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536,
                                image_size=518, layer_scale=True),
    "vit_b14_dinov2": ViTConfig(patch_size=14, width=768, depth=12, num_heads=12, mlp_dim=3072,
                                image_size=518, layer_scale=True),
    # DINOv2 with 4 registers (timm's vit_*_patch14_reg4_dinov2.lvd142m).
    "vit_s14_dinov2_reg4": ViTConfig(patch_size=14, width=384, depth=12, num_heads=6,
                                     mlp_dim=1536, image_size=518, layer_scale=True, registers=4),
    "vit_b14_dinov2_reg4": ViTConfig(patch_size=14, width=768, depth=12, num_heads=12,
                                     mlp_dim=3072, image_size=518, layer_scale=True, registers=4),
}


def get_config(arch: str, **overrides) -> ViTConfig:
  if arch not in PRESETS:
    raise ValueError(f"unknown backbone arch {arch!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[arch].replace(**overrides)


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


def _dense(config: ViTConfig, width: int, name: str) -> nn.Dense:
  return nn.Dense(width, dtype=jnp.dtype(config.dtype), name=name,
                  kernel_init=nn.initializers.xavier_uniform())


def _norm(config: ViTConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.dtype(config.dtype), name=name)


class Attention(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    head_dim = c.width // c.num_heads
    dense = lambda name: _dense(c, c.width, name)
    split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
    q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    return dense("proj")(out)


class LayerScale(nn.Module):
  """DINOv2's per-channel scale of a residual branch (initialised at 1e-5, as DINOv2 trains)."""

  width: int

  @nn.compact
  def __call__(self, x):
    return x * self.param("gamma", nn.initializers.constant(1e-5), (self.width,)).astype(x.dtype)


class Block(nn.Module):
  """Pre-LN transformer block; the (carry, None) signature is what `nn.scan` expects."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x, _):
    c = self.config
    scale = ((lambda name: LayerScale(c.width, name=name)) if c.layer_scale
             else (lambda name: lambda y: y))
    x = x + scale("ls1")(Attention(c, name="attn")(_norm(c, "norm1")(x)))
    y = _dense(c, c.mlp_dim, "fc1")(_norm(c, "norm2")(x))
    y = _dense(c, c.width, "fc2")(nn.gelu(y, approximate=False))
    return x + scale("ls2")(y), None


class VisionTransformer(nn.Module):
  """images [B, H, W, 3] (normalised float) → CLS features [B, width] (float32)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                dtype=dtype, name="patch_embed")(images.astype(dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, c.width)
    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", init, (1, 1, c.width))
    cls = jnp.broadcast_to(cls, (batch, 1, c.width)).astype(dtype)
    if c.registers:  # timm's no_embed_class: add the patches' positions, then prepend
      pos = self.param("pos_embed", init, (1, c.grid ** 2, c.width))
      x = x + resample_pos_embed(pos, grid_h, grid_w, prefix=0).astype(dtype)
      registers = self.param("reg_token", init, (1, c.registers, c.width))
      registers = jnp.broadcast_to(registers, (batch, c.registers, c.width)).astype(dtype)
      x = jnp.concatenate([cls, registers, x], axis=1)
    else:
      pos = self.param("pos_embed", init, (1, 1 + c.grid ** 2, c.width))
      x = jnp.concatenate([cls, x], axis=1)
      x = x + resample_pos_embed(pos, grid_h, grid_w).astype(dtype)
    block = nn.remat(Block) if c.remat else Block
    blocks = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     length=c.depth, unroll=c.depth if c.unroll_blocks else 1)
    x, _ = blocks(c, name="blocks")(x, None)
    x = _norm(c, "norm")(x)
    return x[:, 0].astype(jnp.float32)


def require_plain_blocks(config: ViTConfig, what: str) -> None:
  """The re-implemented forwards of circuits and compression know DINO's blocks and tokens,
  not LayerScale's or registers': refuse rather than compute a different network."""
  if config.layer_scale or config.registers:
    from smat.errors import SmatError

    raise SmatError(f"{what} supports DINO's ViT, not DINOv2's LayerScale or registers; "
                    f"use a learned or another hand-designed mask strategy")


def init(config: ViTConfig, key: jax.Array) -> dict:
  """Freshly initialised parameters (timm-like: Xavier linears, N(0, 0.02) embeddings)."""
  images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return VisionTransformer(config).init(key, images)["params"]


def param_shapes(config: ViTConfig) -> dict:
  """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating weights."""
  return jax.eval_shape(lambda: init(config, jax.random.key(0)))


def forward(params: dict, images: jax.Array, config: ViTConfig, rngs=None) -> jax.Array:
  """Pure forward pass: normalised images [B, H, W, 3] → CLS features [B, width].

  `rngs` (e.g. {"dropout": key}) reach every block, split per block, for method interceptors
  such as LoRA's dropout (`smat.finetune`); the backbone itself draws no randomness.
  """
  return VisionTransformer(config).apply({"params": params}, images, rngs=rngs)


def preprocess(images: jax.Array, config: ViTConfig) -> jax.Array:
  """uint8 or [0, 1] float images → the backbone's normalised input (mean/std of its training)."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(config.mean)) / jnp.asarray(config.std)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
