"""DINO's self-supervised objective (Caron et al., 2021) as small pure JAX functions.

θ_pre must be learnt apart from the meta-training labels (protocol: "The offline benchmark"), as
the paper's DINO backbone is. DINO needs no labels: a student (ViT + projection head) learns to
predict, from every view of an image, the centred and sharpened output of a teacher on the other
(global) views; the teacher is an exponential moving average (EMA) of the student. Centring
keeps one prototype from winning every image, sharpening keeps the teacher from going uniform;
together they avoid collapse without negatives.

What is here, with the reference's name (facebookresearch/dino) in brackets:

* the projection head [`DINOHead`]: MLP with GELU → L2-normalised bottleneck → weight-normalised
  linear layer onto K prototypes, its norm fixed to 1 (`norm_last_layer=True`);
* the loss [`DINOLoss`]: cross-entropy between each teacher global view and each student view
  of a *different* view, averaged over views pairs; the centre EMA of the teacher outputs;
* the schedules [`cosine_scheduler`]: lr (warm-up + cosine), weight decay (cosine up), teacher
  momentum (cosine 0.996 → 1), teacher temperature (linear warm-up, then constant);
* per-parameter gradient clipping [`clip_gradients`] and the frozen last layer
  [`cancel_gradients_last_layer`], as optax-friendly tree functions;
* multi-crop augmentation [`DataAugmentationDINO`] on device: 2 global crops at the training
  size, `n` local crops at a smaller size; the ViT runs on the local size with its position
  embeddings resampled on the fly (`smat.models.vit.resample_pos_embed`);
* one jitted step, `train_step`: student gradients through both crop sizes, the teacher
  forward on the global crops without gradients, EMA and centre updates — no host round-trip.

Deviations from the reference (all configurable where it matters; see
`smat/configs/pretrain_dino_glyphs.py`):
* schedules are indexed by optimiser step, not epoch (the teacher temperature and the frozen
  last layer count steps), so a run of a few hundred steps can still warm up;
* weight decay follows this project's mask (every `kernel`, including the last layer's
  direction), not DINO's "every tensor of rank > 1" (which also decays `pos_embed` and
  `cls_token`);
* per-parameter clipping treats each layer of the stacked blocks as its own parameter, as
  PyTorch's separate per-block tensors are;
* crops are resized bilinearly with antialiasing (DINO: bicubic); no hue jitter; the colour
  jitter applies brightness, contrast, saturation in that fixed order (torchvision: random);
* no stochastic depth in the student (the project's ViT has none).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smat.data import augment as aug
from smat.models import vit

# ----------------------------------------------------------------------------- head


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """DINO's projection head. The reference defaults (hidden 2048, bottleneck 256, K = 65,536)
  suit ImageNet and ViT-S; a 128-wide ViT on a 30k-image pool takes a smaller one."""

  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  out_dim: int = 65536
  layers: int = 3  # linear layers before the bottleneck normalisation
  norm_last_layer: bool = True  # the prototypes' norm fixed to 1 (else a learned scale `g`)


def init_head(key: jax.Array, in_dim: int, config: HeadConfig) -> dict:
  """{"mlp": {"dense_i": {kernel, bias}}, "last_layer": {"kernel" [bottleneck, K], ("g" [K])}}.

  As the reference: MLP kernels ~ truncated N(0, 0.02), biases 0; the last layer's direction
  `kernel` ~ U(±1/√bottleneck) (PyTorch's Linear default), its scale `g` 1."""
  dims = ([in_dim] + [config.hidden_dim] * (config.layers - 1) + [config.bottleneck_dim])
  keys = jax.random.split(key, config.layers + 1)
  trunc = jax.nn.initializers.truncated_normal(0.02)
  mlp = {f"dense_{i}": {"kernel": trunc(keys[i], (dims[i], dims[i + 1])),
                        "bias": jnp.zeros((dims[i + 1],))}
         for i in range(config.layers)}
  bound = 1 / math.sqrt(config.bottleneck_dim)
  last = {"kernel": jax.random.uniform(keys[-1], (config.bottleneck_dim, config.out_dim),
                                       minval=-bound, maxval=bound)}
  if not config.norm_last_layer:
    last["g"] = jnp.ones((config.out_dim,))
  return {"mlp": mlp, "last_layer": last}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(‖x‖, eps), PyTorch's `F.normalize`."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def prototypes(last_layer: dict) -> jax.Array:
  """Weight normalisation: each prototype (column) is `g · v / ‖v‖`; with no `g` its norm is 1,
  so the logits are cosines of the bottleneck with the prototypes (bounded, hence stable)."""
  w = l2_normalize(last_layer["kernel"], axis=0)
  return w * last_layer["g"] if "g" in last_layer else w


def head_apply(params: dict, features: jax.Array) -> jax.Array:
  """features [..., D] → prototype logits [..., K]: MLP (exact GELU between layers), L2
  normalisation of the bottleneck, weight-normalised last layer."""
  x = features
  layers = len(params["mlp"])
  for i in range(layers):
    layer = params["mlp"][f"dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < layers - 1:
      x = jax.nn.gelu(x, approximate=False)
  return l2_normalize(x) @ prototypes(params["last_layer"])


# ----------------------------------------------------------------------------- loss


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, temperature) -> jax.Array:
  """softmax((t − center) / τ_t): centring removes the prototype every image favours, a low
  τ_t sharpens; the two pull in opposite directions, which is what prevents collapse."""
  return jax.nn.softmax((teacher_logits - center) / temperature, axis=-1)


def student_log_probs(student_logits: jax.Array, temperature) -> jax.Array:
  """log softmax(s / τ_s); τ_s (0.1) is above τ_t, so the student is the softer of the two."""
  return jax.nn.log_softmax(student_logits / temperature, axis=-1)


def pair_mask(teacher_views: int, student_views: int) -> np.ndarray:
  """[G, V] bool: which (teacher view g, student view v) pairs enter the loss. Student views are
  ordered globals first, so v = g is the same crop and is left out: G·V − G pairs."""
  return ~np.eye(teacher_views, student_views, dtype=bool)


def multicrop_loss(student_logits: jax.Array, teacher_logits: jax.Array, center: jax.Array,
                   teacher_temp, student_temp) -> jax.Array:
  """DINO's loss: student_logits [V, B, K] (the G global views first, then the local ones),
  teacher_logits [G, B, K] → the batch-mean cross-entropy H(P_t(g), P_s(v)), averaged over
  the pairs of `pair_mask`. No gradient reaches the teacher."""
  q = jax.lax.stop_gradient(teacher_probs(teacher_logits, center, teacher_temp))
  log_p = student_log_probs(student_logits, student_temp)
  # [G, V]: batch mean of −Σ_k q_gbk log p_vbk.
  cross = -jnp.einsum("gbk,vbk->gv", q, log_p) / q.shape[1]
  mask = pair_mask(q.shape[0], log_p.shape[0])
  return jnp.sum(jnp.where(mask, cross, 0.0)) / mask.sum()


def update_center(center: jax.Array, teacher_logits: jax.Array, momentum) -> jax.Array:
  """center ← m · center + (1 − m) · mean of the teacher logits [G, B, K] over views and batch.

  Under jit with the batch sharded over the "data" mesh axis the mean is over the global
  batch: XLA inserts the all-reduce the reference does by hand (`dist.all_reduce`)."""
  batch_mean = jnp.mean(teacher_logits.reshape(-1, teacher_logits.shape[-1]), axis=0)
  return momentum * center + (1 - momentum) * batch_mean


def entropies(teacher_logits: jax.Array, center: jax.Array, temperature) -> tuple:
  """(mean per-image entropy of the teacher, entropy of its batch-mean distribution), in nats:
  DINO's collapse monitors. Both → 0: one prototype wins every image (collapse); both → log K:
  a uniform teacher (the other collapse); healthy: the first low, the second high."""
  q = teacher_probs(teacher_logits, center, temperature)
  h = lambda p: -jnp.sum(p * jnp.log(jnp.clip(p, 1e-30)), axis=-1)
  return h(q).mean(), h(q.reshape(-1, q.shape[-1]).mean(0))


# ----------------------------------------------------------------------------- schedules


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """DINO's `cosine_scheduler`, by step: linear warmup_start → base over `warmup_steps`, then
  final + ½(base − final)(1 + cos(π · t / T)) over the remaining T steps; `final` from
  `total_steps` on."""
  decay = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps, 1)
    t = jnp.clip(step - warmup_steps, 0, decay)
    cos = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * t / decay))
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def teacher_temperature(warmup_temp: float, temp: float, warmup_steps: int
                        ) -> Callable[[jax.Array], jax.Array]:
  """τ_t: linear warmup_temp → temp over `warmup_steps`, then constant. A high τ_t early on makes
  training unstable (the reference warms up 0.04 → 0.07 over 30 epochs)."""
  def schedule(step):
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
    return warmup_temp + (temp - warmup_temp) * frac

  return schedule


def ema(teacher, student, momentum):
  """teacher ← m · teacher + (1 − m) · student, leaf by leaf (the teacher has no optimiser)."""
  return jax.tree.map(lambda t, s: momentum * t + (1 - momentum) * s, teacher, student)


# ----------------------------------------------------------------------------- optimiser


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def is_stacked(path) -> bool:
  """Whether a parameter holds one tensor per block along axis 0 (the ViT's scanned blocks)."""
  return "blocks" in _keys(path)


def clip_per_parameter(max_norm: float,
                       stacked: Callable = is_stacked) -> optax.GradientTransformation:
  """DINO's `clip_gradients`: each parameter's gradient scaled by min(1, c / (‖g‖ + 1e-6)) on
  its own (not by the global norm). A stacked block parameter is clipped per block."""
  def clip(path, g):
    axes = tuple(range(1, g.ndim)) if stacked(path) and g.ndim > 1 else None
    norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=axes is not None))
    return g * jnp.minimum(1.0, max_norm / (norm + 1e-6))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def is_last_layer(path) -> bool:
  return "last_layer" in _keys(path)


def freeze_last_layer(tree, frozen) -> dict:
  """Zero the head's last layer (gradients, then updates) while `frozen` (a traced bool):
  the reference drops those gradients during the first epoch, which helps training start.

  NOTE: optax keeps one step count for Adam's bias correction where PyTorch counts per
  parameter, so the last layer's first unfrozen steps are smaller than the reference's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.where(frozen, jnp.zeros_like(x), x) if is_last_layer(path) else x,
      tree)


def decay_mask(params):
  """Weight decay on every `kernel` (dense, patch embedding, the prototypes' directions); not on
  biases, LayerNorm, embeddings or the last layer's scale."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _keys(path)[-1] == "kernel", params)


def make_optimizer(lr: Callable, weight_decay: Callable, grad_clip: float
                   ) -> optax.GradientTransformation:
  """Per-parameter clipping, then AdamW (β 0.9, 0.999) with scheduled lr and weight decay."""
  chain = [clip_per_parameter(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*chain, optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=weight_decay,
                                         mask=decay_mask))


# ----------------------------------------------------------------------------- multi-crop


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """One kind of crop. Defaults: DINO's global view; probabilities 0 skip the work."""

  size: int
  crop_scale: tuple[float, float] = (0.4, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  gray_prob: float = 0.2
  blur_prob: float = 1.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output crop
  solarize_prob: float = 0.0


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """The views of one image: the global ones (each its own recipe: DINO blurs the first always,
  the second rarely and solarises it sometimes) and `local_crops` local ones."""

  global_views: tuple[ViewConfig, ...]
  local_view: ViewConfig
  local_crops: int

  @property
  def num_views(self) -> int:
    return len(self.global_views) + self.local_crops


def grayscale(image: jax.Array) -> jax.Array:
  """[H, W, 3] → its luma in all three channels."""
  return jnp.broadcast_to((image @ jnp.asarray(aug._LUMA))[..., None], image.shape)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Invert the pixels at or above `threshold` (PIL's `ImageOps.solarize`, on [0, 1])."""
  return jnp.where(image >= threshold, 1.0 - image, image)


def gaussian_blur(key: jax.Array, image: jax.Array, sigma_range) -> jax.Array:
  """Separable Gaussian blur, σ ~ U(sigma_range) pixels, reflect padding. The kernel radius is
  static (3 σ_max, at most size − 1), so one compiled shape serves every σ."""
  size = image.shape[0]
  radius = max(1, min(int(math.ceil(3 * sigma_range[1])), size - 1))
  sigma = jax.random.uniform(key, minval=sigma_range[0], maxval=sigma_range[1])
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(taps / sigma))
  w = w / w.sum()
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(w[i] * padded[i:i + size] for i in range(2 * radius + 1))
  return sum(w[i] * rows[:, i:i + size] for i in range(2 * radius + 1))


def augment_view(key: jax.Array, image: jax.Array, view: ViewConfig) -> jax.Array:
  """One float image [S, S, 3] in [0, 1] → one crop [size, size, 3] in [0, 1]: random resized
  crop, flip, colour jitter (applied with `jitter_prob`), grayscale, blur, solarisation."""
  k_crop, k_flip, k_jit, k_jit_on, k_gray, k_blur, k_blur_on, k_sol = jax.random.split(key, 8)
  x = aug.random_resized_crop(k_crop, image, view.crop_scale, view.crop_ratio, view.size)
  draw = lambda k, p: jax.random.bernoulli(k, p)
  if view.flip_prob > 0:
    x = jnp.where(draw(k_flip, view.flip_prob), x[:, ::-1], x)
  if view.jitter_prob > 0:
    x = jnp.where(draw(k_jit_on, view.jitter_prob),
                  aug.color_jitter(k_jit, x, view.brightness, view.contrast, view.saturation), x)
  if view.gray_prob > 0:
    x = jnp.where(draw(k_gray, view.gray_prob), grayscale(x), x)
  if view.blur_prob > 0:
    x = jnp.where(draw(k_blur_on, view.blur_prob), gaussian_blur(k_blur, x, view.blur_sigma), x)
  if view.solarize_prob > 0:
    x = jnp.where(draw(k_sol, view.solarize_prob), solarize(x), x)
  return x


def multicrop(key: jax.Array, images: jax.Array, config: MultiCropConfig
              ) -> tuple[jax.Array, jax.Array]:
  """images [B, S, S, 3] (uint8 or [0, 1] float) → (global crops [G, B, S_g, S_g, 3], local
  crops [n, B, S_l, S_l, 3]), floats in [0, 1]. View v of image i draws from
  fold_in(fold_in(key, v), i): independent of the batch's sharding over devices."""
  floats = aug.to_float(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
  index = jnp.arange(floats.shape[0])

  def views(first: int, recipes: Sequence[ViewConfig]) -> jax.Array:
    out = []
    for v, recipe in enumerate(recipes, start=first):
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, v), i))(index)
      out.append(jax.vmap(augment_view, in_axes=(0, 0, None))(keys, floats, recipe))
    return jnp.stack(out)

  g = len(config.global_views)
  local = (views(g, [config.local_view] * config.local_crops) if config.local_crops else
           jnp.zeros((0, floats.shape[0], config.local_view.size, config.local_view.size, 3)))
  return views(0, config.global_views), local


# ----------------------------------------------------------------------------- network, step


def forward(params: dict, crops: Sequence[jax.Array], vit_config: vit.ViTConfig) -> jax.Array:
  """Backbone + head on groups of crops [N_j, B, S_j, S_j, 3] in [0, 1] → logits
  [Σ N_j, B, K]. One backbone call per crop size (DINO's `MultiCropWrapper`); the ViT resamples
  its position embeddings to each size; one head call on all features."""
  features, counts = [], []
  for group in crops:
    if group.shape[0] == 0:
      continue
    n, b = group.shape[:2]
    x = vit.preprocess(group.reshape(n * b, *group.shape[2:]), vit_config)
    features.append(vit.forward(params["backbone"], x, vit_config))
    counts.append(n)
  logits = head_apply(params["head"], jnp.concatenate(features))
  return logits.reshape(sum(counts), -1, logits.shape[-1])


class DinoState(NamedTuple):
  student: dict  # {"backbone": ViT params, "head": head params}: what the optimiser trains
  teacher: dict  # the same tree, an EMA of the student; its backbone is the θ_pre written
  center: jax.Array  # [K]
  opt_state: optax.OptState
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class Hyper:
  """The step's scalar hyper-parameters (schedules are functions of the step)."""

  total_steps: int
  student_temp: float = 0.1
  teacher_temp: float = 0.07
  warmup_teacher_temp: float = 0.04
  warmup_teacher_temp_steps: int = 0
  center_momentum: float = 0.9
  momentum_teacher: float = 0.996
  freeze_last_layer_steps: int = 0

  def teacher_temp_at(self, step):
    return teacher_temperature(self.warmup_teacher_temp, self.teacher_temp,
                               self.warmup_teacher_temp_steps)(step)

  def momentum_at(self, step):
    return cosine_schedule(self.momentum_teacher, 1.0, self.total_steps)(step)


def init_state(key: jax.Array, vit_config: vit.ViTConfig, head: HeadConfig,
               optimizer: optax.GradientTransformation) -> DinoState:
  """Student from `vit.init` and `init_head`; the teacher starts as its copy, the centre at 0."""
  k_backbone, k_head = jax.random.split(key)
  student = {"backbone": vit.init(vit_config, k_backbone),
             "head": init_head(k_head, vit_config.width, head)}
  teacher = jax.tree.map(jnp.array, student)
  return DinoState(student, teacher, jnp.zeros((head.out_dim,)), optimizer.init(student),
                   jnp.zeros((), jnp.int32))


def loss_fn(student: dict, global_crops, local_crops, teacher_logits, center, teacher_temp,
            student_temp, vit_config):
  logits = forward(student, (global_crops, local_crops), vit_config)
  return multicrop_loss(logits, teacher_logits, center, teacher_temp, student_temp)


def train_step(state: DinoState, images: jax.Array, key: jax.Array, *,
               optimizer: optax.GradientTransformation, vit_config: vit.ViTConfig,
               crops: MultiCropConfig, hyper: Hyper):
  """One pure DINO step on uint8 images [B, S, S, 3]; its key is fold_in(key, step).

  Student gradients flow through the global and local crops; the teacher sees the global crops
  only, without gradients; then the student update, the teacher EMA (momentum at this step)
  and the centre update (with this batch's teacher outputs, after the loss used the old one)."""
  step = state.step
  global_crops, local_crops = multicrop(jax.random.fold_in(key, step), images, crops)
  teacher_logits = jax.lax.stop_gradient(forward(state.teacher, (global_crops,), vit_config))
  teacher_temp = hyper.teacher_temp_at(step)
  loss, grads = jax.value_and_grad(loss_fn)(state.student, global_crops, local_crops,
                                            teacher_logits, state.center, teacher_temp,
                                            hyper.student_temp, vit_config)
  frozen = step < hyper.freeze_last_layer_steps
  grads = freeze_last_layer(grads, frozen)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.student)
  student = optax.apply_updates(state.student, freeze_last_layer(updates, frozen))
  momentum = hyper.momentum_at(step)
  teacher = ema(state.teacher, student, momentum)
  center = update_center(state.center, teacher_logits, hyper.center_momentum)
  entropy, marginal = entropies(teacher_logits, state.center, teacher_temp)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "teacher_temp": teacher_temp,
             "momentum": momentum, "teacher_entropy": entropy,
             "teacher_marginal_entropy": marginal}
  return DinoState(student, teacher, center, opt_state, step + 1), metrics


# ----------------------------------------------------------------------------- from a config


def head_config(config) -> HeadConfig:
  d = config.pretrain.dino
  return HeadConfig(hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                    out_dim=d.out_dim, layers=d.head_layers, norm_last_layer=d.norm_last_layer)


def multicrop_config(config) -> MultiCropConfig:
  """The glyph-friendly recipe of `config.pretrain.dino` (flip and solarisation configurable:
  a mirrored letter is often another letter, and solarising white-on-black glyphs erases
  them)."""
  d = config.pretrain.dino
  common = dict(crop_ratio=(3 / 4, 4 / 3), flip_prob=d.flip_prob, jitter_prob=d.jitter_prob,
                brightness=d.brightness, contrast=d.contrast, saturation=d.saturation,
                gray_prob=d.gray_prob, blur_sigma=tuple(d.blur_sigma))
  size = config.data.image_size
  first = ViewConfig(size, tuple(d.global_crop_scale), blur_prob=d.global_blur_prob[0], **common)
  second = ViewConfig(size, tuple(d.global_crop_scale), blur_prob=d.global_blur_prob[1],
                      solarize_prob=d.solarize_prob, **common)
  local = ViewConfig(d.local_size, tuple(d.local_crop_scale), blur_prob=d.local_blur_prob,
                     **common)
  return MultiCropConfig((first, second), local, d.local_crops)


def hyper(config) -> Hyper:
  d = config.pretrain.dino
  return Hyper(total_steps=config.pretrain.steps, student_temp=d.student_temp,
               teacher_temp=d.teacher_temp, warmup_teacher_temp=d.warmup_teacher_temp,
               warmup_teacher_temp_steps=d.warmup_teacher_temp_steps,
               center_momentum=d.center_momentum, momentum_teacher=d.momentum_teacher,
               freeze_last_layer_steps=d.freeze_last_layer_steps)


def lr_schedule(config) -> Callable:
  """Linear warm-up to `pretrain.lr`, cosine down to `pretrain.min_lr` (the reference scales its
  0.0005 by batch / 256; here `lr` is the peak itself)."""
  p = config.pretrain
  return cosine_schedule(p.lr, p.min_lr, p.steps, p.warmup_steps)


def weight_decay_schedule(config) -> Callable:
  p = config.pretrain
  return cosine_schedule(p.weight_decay, p.weight_decay_end, p.steps)


def optimizer_from(config) -> optax.GradientTransformation:
  return make_optimizer(lr_schedule(config), weight_decay_schedule(config),
                        config.pretrain.grad_clip)


def check_config(config, vit_config: vit.ViTConfig) -> None:
  """Refuse crop sizes the ViT would silently truncate (a VALID patch convolution)."""
  from smat.errors import SmatError

  patch, local = vit_config.patch_size, config.pretrain.dino.local_size
  if local % patch or local <= 0:
    raise SmatError(f"config field pretrain.dino.local_size={local} must be a positive multiple "
                    f"of the backbone's patch size {patch}")
