"""The Vision Transformer of DINO (ViT-S/16, ViT-B/16) and small CPU presets, in Flax.

Architecture (DINO / timm `VisionTransformer`, no classifier head): 16×16 patch embedding
(a strided convolution with bias), a CLS token, learned absolute position embeddings, `depth`
pre-LN blocks (LayerNorm → multi-head self-attention with biased query/key/value → residual;
LayerNorm → MLP with exact GELU → residual), a final LayerNorm; the feature is the CLS token.

Parameters are a plain pytree with readable names, e.g. `blocks/attn/query/kernel` [depth, D, D]
(their names, kinds and the block maths as pure functions: `smat.models.layout`):
the blocks are stacked along a leading layer axis (one `nn.scan`), so per-layer analyses index
axis 0 and a config switch trades compile time for speed (`unroll_blocks`). `forward(params, images, config)`
is a pure function of the parameters, so SMAT evaluates θ_pre + m ⊙ δ by passing that tree.

When images have another size than the one the position embeddings were trained for, the patch
grid of the embeddings is resampled on the fly exactly as DINO does (bicubic, a = −0.75,
`scale_factor = (n + 0.1) / N`), so a delta on the position embeddings stays defined on the
original grid, as in the paper (224-px weights run at 128 px; `layout.resample_pos_embed`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from smat.models import layout
# Part of this module's interface: DINO's position-embedding resampling, and the refusal of the
# functional forwards (`layout`) to compute DINOv2's blocks.
from smat.models.layout import cubic_resize_matrix, require_plain_blocks, resample_pos_embed

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
    head_dim = c.width // c.num_heads
    dense = lambda name: _dense(c, c.width, name)
    split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, head_dim)
    q, k, v = (split(dense(name)(x)) for name in layout.QKV)
    return dense(layout.PROJ)(layout.attend(q, k, v).reshape(x.shape))


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
    ls1, ls2 = layout.LAYER_SCALES
    x = x + scale(ls1)(Attention(c, name=layout.ATTN)(_norm(c, layout.NORM1)(x)))
    y = _dense(c, c.mlp_dim, layout.FC1)(_norm(c, layout.NORM2)(x))
    y = _dense(c, c.width, layout.FC2)(layout.gelu(y))
    return x + scale(ls2)(y), None


class VisionTransformer(nn.Module):
  """images [B, H, W, 3] (normalised float) → CLS features [B, width] (float32)."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    patches = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size,
                      padding="VALID", dtype=dtype, name=layout.PATCH_EMBED)(images.astype(dtype))
    init = nn.initializers.normal(0.02)
    cls = self.param(layout.CLS_TOKEN, init, (1, 1, c.width))
    pos = self.param(layout.POS_EMBED, init, (1, (0 if c.registers else 1) + c.grid ** 2, c.width))
    registers = (self.param(layout.REG_TOKEN, init, (1, c.registers, c.width)) if c.registers
                 else None)
    x = layout.tokens(patches, cls, pos, registers, dtype)
    block = nn.remat(Block) if c.remat else Block
    blocks = nn.scan(block, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     length=c.depth, unroll=c.depth if c.unroll_blocks else 1)
    x, _ = blocks(c, name=layout.BLOCKS)(x, None)
    x = _norm(c, layout.FINAL_NORM)(x)
    return x[:, 0].astype(jnp.float32)


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
