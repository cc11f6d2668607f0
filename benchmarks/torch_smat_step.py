"""SMAT's meta-training step written in PyTorch, to time beside smat's jitted JAX step on the CPU.

`python -m benchmarks.cpu_side_by_side --workload smat_step` runs this file in an interpreter
that has torch and timm (smat cannot be imported there). It passes one JSON argument holding the
hyper-parameters it read from the smat config (`cpu_side_by_side.smat_step_spec`), so the two
frameworks run the same step and cannot drift apart. The worker builds the step, runs
`spec["warmup"]` steps, prints one "ready" line, and then answers each line on stdin with the
wall and CPU seconds of `spec["repeats"]` steps.

One step does what `smat.meta.step.meta_train_step` does for the method "smat": one
hard-concrete gate per element of every backbone parameter, no mask strategy, float32. For each
task of the meta-batch:
  augmentation   random resized crop and colour jitter (and flip) of every image (`augmented`)
  router pass    θ_pre on the support, without gradient → prototypes → router block → α
  merge          gates z_k sampled for every expert, m = Σ_k α_k z_k, θ_task = θ_pre + m ⊙ δ
  inner step     θ_task on the support, then one SGD step. It is FIRST order, as in smat: the
                 inner gradient is a constant of the outer loss, so nothing differentiates
                 through it. The head gets the stepped prototypes' value, while its gradient
                 goes through the prototypes (the straight-through re-attach)
  student pass   the adapted θ on the query → query cross-entropy
  teachers       a dense teacher: the adapted θ after one SGD step on the query CE (that
                 gradient comes back through the student pass), then its query pass; then
                 θ_pre on the query with θ_pre's prototypes. Both are detached → distillation
Then come the meta-batch's sparsity terms: the deterministic masks' sparsity, the expected L0
and the λ reset. The outer backward runs through every part above that is not detached: the
student pass, the support pass through the prototypes, the merge, the gates and the router.
Last, each of the four groups is updated at smat's per-epoch warm-up/cosine learning rate:
δ by SGD with momentum and weight decay, the gate logits by a global-norm clip then SGD (then
clamped), λ by SGD ascent (then kept ≥ 0), the router by a global-norm clip then AdamW.

What differs is how the step runs, not its maths. smat vmaps the tasks, and XLA fuses the whole
step. Here the tasks run one after another, and each task's backward runs once its loss is known
(the gradients add up). Each group's parameters are held as one flat vector (δ [P],
log α [M, P]) and handed to timm as views named like its parameters, so the merge and the updates
are a few large tensor operations. smat's episodes can be padded and carry masks; these are not
padded, so there are none. smat recomputes the gates in the backward pass (a custom VJP);
autograd keeps them in memory.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.func import functional_call

LUMA = (0.299, 0.587, 0.114)
NOISE_EPS = 1e-6  # how far u stays from 0 and 1 (gates and router)
FIRST_EPOCH_GROUPS = ("delta", "gates", "lam")  # at first_epoch_lr in epoch 0 (the router: 0)


# ------------------------------------------------------------------------------------------------
# The backbone: timm's ViT, called on a flat parameter vector.

class FlatLayout:
  """The names, shapes and offsets of the backbone's parameters inside one flat vector."""

  def __init__(self, named: dict[str, torch.Tensor]):
    self.names = list(named)
    self.shapes = [named[n].shape for n in self.names]
    self.sizes = [named[n].numel() for n in self.names]
    self.total = sum(self.sizes)

  def flatten(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([named[n].reshape(-1) for n in self.names])

  def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of `flat` (its last axis) under the parameter names; gradients reach `flat`."""
    pieces = torch.split(flat, self.sizes, dim=-1)
    return {n: p.view(*flat.shape[:-1], *s) for n, p, s in zip(self.names, pieces, self.shapes)}


def build_backbone(b: dict) -> VisionTransformer:
  """timm's ViT with smat's dimensions (qkv bias, LayerNorm eps, CLS feature, no head), frozen:
  its parameters come in through `functional_call`."""
  model = VisionTransformer(img_size=b["image_size"], patch_size=b["patch"], embed_dim=b["width"],
                            depth=b["depth"], num_heads=b["heads"],
                            mlp_ratio=b["mlp"] / b["width"], qkv_bias=True, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm,
                                                         eps=b["layer_norm_eps"]))
  return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# Images: augmentation (smat.data.augment) and normalisation.

def uniform(shape, low, high) -> torch.Tensor:
  return torch.empty(shape).uniform_(low, high)


def random_resized_crop(images: torch.Tensor, scale, ratio) -> torch.Tensor:
  """A random box per image (area fraction ~ U(scale), log aspect ~ U(log ratio)) resized back
  to the image's size, bilinearly. The crop is never larger than the image, so this only
  enlarges, and smat's antialiased linear resize is the plain bilinear one."""
  n = images.shape[0]
  area = uniform((n,), *scale)
  aspect = torch.exp(uniform((n,), math.log(ratio[0]), math.log(ratio[1])))
  side = images.shape[-1]
  width = torch.sqrt(area * aspect).clamp(1.0 / side, 1.0)  # fractions of the side
  height = torch.sqrt(area / aspect).clamp(1.0 / side, 1.0)
  top, left = uniform((n,), 0, 1) * (1 - height), uniform((n,), 0, 1) * (1 - width)
  affine = torch.zeros(n, 2, 3)  # output coordinates in [-1, 1] → input coordinates
  affine[:, 0, 0], affine[:, 0, 2] = width, 2 * left + width - 1
  affine[:, 1, 1], affine[:, 1, 2] = height, 2 * top + height - 1
  grid = F.affine_grid(affine, list(images.shape), align_corners=False)
  return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(images: torch.Tensor, brightness: float, contrast: float,
                  saturation: float) -> torch.Tensor:
  """Brightness, contrast and saturation factors ~ U[1 − s, 1 + s] per image, in that order."""
  factor = lambda s: uniform((images.shape[0], 1, 1, 1), 1 - s, 1 + s)
  gray = lambda x: (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
  images = (images * factor(brightness)).clamp(0, 1)
  mean = gray(images).mean((2, 3), keepdim=True)
  images = ((images - mean) * factor(contrast) + mean).clamp(0, 1)
  g = gray(images)
  return ((images - g) * factor(saturation) + g).clamp(0, 1)


def augmented(images: torch.Tensor, a: dict) -> torch.Tensor:
  """Float images [N, 3, H, W] in [0, 1], each augmented independently."""
  images = random_resized_crop(images, a["crop_scale"], a["crop_ratio"])
  images = colour_jitter(images, a["brightness"], a["contrast"], a["saturation"])
  flip = torch.rand(images.shape[0], 1, 1, 1) < a["flip_prob"]
  return torch.where(flip, images.flip(-1), images)


def model_input(images: torch.Tensor, b: dict, augment: dict | None) -> torch.Tensor:
  """uint8 images → (augmented) float images normalised by the backbone's mean and std."""
  images = images.float() / 255.0
  if augment is not None:
    images = augmented(images, augment)
  mean, std = (torch.tensor(b[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
  return (images - mean) / std


# ------------------------------------------------------------------------------------------------
# The ProtoNet head and the losses (smat.protonet, smat.meta.tasks).

def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
  onehot = F.one_hot(labels, ways).to(features.dtype)
  return (onehot.T @ features) / onehot.sum(0)[:, None].clamp_min(1.0)


def l2_normalise(x: torch.Tensor) -> torch.Tensor:
  return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(1e-24))


def cosine_logits(features: torch.Tensor, head: torch.Tensor, scale: float) -> torch.Tensor:
  return scale * l2_normalise(features) @ l2_normalise(head).T


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, t: float) -> torch.Tensor:
  """Mean over rows of KL(softmax(p / t) ‖ softmax(q / t))."""
  log_p, log_q = F.log_softmax(p_logits / t, -1), F.log_softmax(q_logits / t, -1)
  return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def distillation(student: torch.Tensor, teacher: torch.Tensor, loss: dict) -> torch.Tensor:
  """T² · KL; "reverse" = KL(student ‖ teacher), as the authors' code calls it."""
  t, teacher = loss["kd_temperature"], teacher.detach()
  pair = (student, teacher) if loss["kd_direction"] == "reverse" else (teacher, student)
  return t * t * kl_divergence(*pair, t)


# ------------------------------------------------------------------------------------------------
# Hard-concrete gates (smat.meta.gates), on [M, P] logits.

def sample_gates(log_alpha: torch.Tensor, e: dict) -> torch.Tensor:
  """Training gates z ∈ [0, 1] with u ~ U(0.5 ± gate_noise), reparameterised in log α."""
  w = e["gate_noise"]
  u = torch.empty_like(log_alpha).uniform_(0.5 - w, 0.5 + w).clamp(NOISE_EPS, 1 - NOISE_EPS)
  s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / e["beta"])
  return (s * (e["zeta"] - e["gamma"]) + e["gamma"]).clamp(0, 1)


def deterministic_gates(log_alpha: torch.Tensor, e: dict) -> torch.Tensor:
  """The meta-test gates: clip(sigmoid(log α) · (ζ − γ) + γ, 0, 1)."""
  return (torch.sigmoid(log_alpha) * (e["zeta"] - e["gamma"]) + e["gamma"]).clamp(0, 1)


def expected_l0(log_alpha: torch.Tensor, e: dict) -> torch.Tensor:
  """[M]: mean over the elements of P(z ≠ 0) = sigmoid(log α − β · ln(−γ / ζ))."""
  p = torch.sigmoid(log_alpha - e["beta"] * math.log(-e["gamma"] / e["zeta"]))
  return p.clamp(1e-6, 1 - 1e-6).mean(-1)


def deployed_sparsity(log_alpha: torch.Tensor, e: dict) -> torch.Tensor:
  """[M]: the fraction of each expert's deterministic gates that are exactly 0."""
  return (deterministic_gates(log_alpha, e) == 0).float().mean(-1)


# ------------------------------------------------------------------------------------------------
# The router (smat.meta.router): one spectral-normalised pre-LN block over the prototypes.

SPECTRAL_LAYERS = ("qkv", "proj", "fc1", "fc2")


def linear_init(fan_in: int, fan_out: int, bias: bool = True) -> dict:
  """torch.nn.Linear's default init, kernel [in, out] as smat stores it."""
  bound = 1.0 / math.sqrt(fan_in)
  layer = {"kernel": uniform((fan_in, fan_out), -bound, bound)}
  if bias:
    layer["bias"] = uniform((fan_out,), -bound, bound)
  return layer


def init_router(dim: int, num_experts: int, r: dict) -> tuple[dict, dict]:
  """(params, spectral (u, v) per dense layer): keys ~ N(0, 2 / D), skills ~ N(0, 1e-3²)."""
  hidden = r["mlp_ratio"] * dim
  norm = lambda: {"scale": torch.ones(dim), "bias": torch.zeros(dim)}
  params = {"norm1": norm(), "qkv": linear_init(dim, 3 * dim, bias=False),
            "proj": linear_init(dim, dim), "norm2": norm(), "fc1": linear_init(dim, hidden),
            "fc2": linear_init(hidden, dim), "skills": 1e-3 * torch.randn(r["skills"], dim),
            "keys": math.sqrt(2.0 / dim) * torch.randn(num_experts, dim)}
  unit = lambda n: F.normalize(torch.randn(n), dim=0)
  spectral = {name: {"u": unit(params[name]["kernel"].shape[1]),
                     "v": unit(params[name]["kernel"].shape[0])} for name in SPECTRAL_LAYERS}
  for _ in range(r["init_power_iterations"]):
    spectral = power_iteration(params, spectral)
  return params, spectral


def leaves(tree: dict) -> list[torch.Tensor]:
  return [x for v in tree.values() for x in (leaves(v) if isinstance(v, dict) else [v])]


@torch.no_grad()
def power_iteration(params: dict, spectral: dict) -> dict:
  """One power iteration per spectral layer: the new (u, v)."""
  def one(kernel, uv):
    v = F.normalize(kernel @ uv["u"], dim=0, eps=1e-12)
    return {"u": F.normalize(kernel.T @ v, dim=0, eps=1e-12), "v": v}
  return {name: one(params[name]["kernel"], spectral[name]) for name in SPECTRAL_LAYERS}


def spectral_normalised(params: dict, spectral: dict) -> dict:
  """Kernels ÷ σ = vᵀ K u, with (u, v) constants of the gradient."""
  out = dict(params)
  for name in SPECTRAL_LAYERS:
    kernel, uv = params[name]["kernel"], spectral[name]
    out[name] = {**params[name], "kernel": kernel / (uv["v"] @ kernel @ uv["u"])}
  return out


def dense(x: torch.Tensor, p: dict) -> torch.Tensor:
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def layer_norm(x: torch.Tensor, p: dict, eps: float) -> torch.Tensor:
  return F.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], eps)


def router_block(p: dict, tokens: torch.Tensor, r: dict) -> torch.Tensor:
  """Pre-LN transformer block on tokens [N, D] (no qkv bias, exact GELU)."""
  n, dim = tokens.shape
  heads, eps = r["heads"], r["layer_norm_eps"]
  qkv = dense(layer_norm(tokens, p["norm1"], eps), p["qkv"])
  q, k, v = qkv.view(n, 3, heads, dim // heads).permute(1, 2, 0, 3)  # each [H, N, dh]
  weights = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, -1)
  x = tokens + dense((weights @ v).permute(1, 0, 2).reshape(n, dim), p["proj"])
  return x + dense(F.gelu(dense(layer_norm(x, p["norm2"], eps), p["fc1"])), p["fc2"])


def expert_logits(p: dict, protos: torch.Tensor, r: dict) -> torch.Tensor:
  """ℓ [M] = K · (the block's output token 0 over [prototypes, skill tokens])."""
  return p["keys"] @ router_block(p, torch.cat([protos, p["skills"]]), r)[0]


def interpolation_weights(logits: torch.Tensor, temperature: float) -> torch.Tensor:
  """α from a RelaxedBernoulli(T, ℓ) sample s (reparameterised): s / (Σ s + 1e-8)."""
  u = torch.rand_like(logits).clamp(NOISE_EPS, 1 - NOISE_EPS)
  s = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
  return s / (s.sum() + 1e-8) if s.shape[0] > 1 else s


# ------------------------------------------------------------------------------------------------
# Optimisation (smat.meta.step.make_optimizer, smat.meta.schedules "epoch").

def epoch_multiplier(epoch: int, warmup: int, horizon: int) -> float:
  if epoch < warmup:
    return epoch / max(warmup, 1)
  progress = min(max((epoch - warmup) / max(horizon - warmup, 1), 0.0), 1.0)
  return 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rates(o: dict, step: int) -> dict[str, float]:
  """Each group's lr at `step`: the peak × the epoch's warm-up/cosine multiplier. In epoch 0,
  δ, the gates and λ run at first_epoch_lr (when ≥ 0), and the router at 0."""
  epoch = step // o["steps_per_epoch"]
  m = epoch_multiplier(epoch, o["warmup_epochs"], o["cosine_epochs"])
  peaks = {"delta": o["delta_lr"], "gates": o["gate_lr"], "lam": o["lambda_lr"],
           "router": o["router_lr"]}
  lrs = {group: peak * m for group, peak in peaks.items()}
  if epoch == 0 and o["first_epoch_lr"] >= 0:
    lrs.update({group: o["first_epoch_lr"] for group in FIRST_EPOCH_GROUPS})
  return lrs


@torch.no_grad()
def clip_by_global_norm(tensors: list[torch.Tensor], max_norm: float) -> None:
  """optax.clip_by_global_norm on the tensors' .grad, in place."""
  grads = [t.grad for t in tensors]
  norm = torch.sqrt(sum((g * g).sum() for g in grads))
  scale = torch.where(norm < max_norm, 1.0, max_norm / norm)
  for g in grads:
    g.mul_(scale)


def make_optimisers(delta, log_alpha, lam, router_leaves, o: dict) -> dict:
  """The four groups; their lrs are set before every step (`learning_rates`)."""
  return {
      "delta": torch.optim.SGD([delta], lr=0.0, momentum=o["delta_momentum"],
                               weight_decay=o["delta_weight_decay"]),
      "gates": torch.optim.SGD([log_alpha], lr=0.0),
      "lam": torch.optim.SGD([lam], lr=0.0),
      "router": torch.optim.AdamW(router_leaves, lr=0.0, weight_decay=o["router_weight_decay"],
                                  betas=(0.9, 0.999), eps=1e-8),
  }


# ------------------------------------------------------------------------------------------------
# The step.

def synthetic_tasks(e: dict, size: int) -> list[dict]:
  """The meta-batch: random-pixel uint8 images with balanced labels (as smat's benchmark)."""
  def task():
    images = lambda n: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    labels = lambda n: torch.arange(n) % e["ways"]
    return {"support_images": images(e["support"]), "support_labels": labels(e["support"]),
            "query_images": images(e["query"]), "query_labels": labels(e["query"])}
  return [task() for _ in range(e["tasks"])]


class SmatStep:
  """The trainable state (δ, gate logits, λ, router) and one meta-training step over it."""

  def __init__(self, spec: dict, theta_pre: dict[str, torch.Tensor] | None = None):
    self.spec = spec
    b, e = spec["backbone"], spec["experts"]
    self.model = build_backbone(b)
    named = theta_pre or {n: p.detach() for n, p in self.model.named_parameters()}
    self.layout = FlatLayout(named)
    self.theta_pre = self.layout.flatten(named)  # θ_pre, frozen: never a gradient
    p, m = self.layout.total, e["num_experts"]
    self.delta = torch.zeros(p, requires_grad=True)
    self.log_alpha = (e["gate_init_std"] * torch.randn(m, p)).clamp(
        e["log_alpha_min"], e["log_alpha_max"]).requires_grad_()
    self.lam = torch.zeros(m, requires_grad=True)
    self.router, self.spectral = init_router(b["width"], m, spec["router"])
    for leaf in leaves(self.router):
      leaf.requires_grad_()
    self.optimisers = make_optimisers(self.delta, self.log_alpha, self.lam,
                                      leaves(self.router), spec["optim"])
    self.step_count, self.tasks_seen = 0, 0

  def features(self, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """CLS features of normalised images under the backbone parameters `flat`."""
    return functional_call(self.model, self.layout.unflatten(flat), (images,))

  def temperature(self) -> float:
    r = self.spec["router"]
    return max(r["temperature_floor"],
               r["temperature_start"] - self.tasks_seen / r["temperature_decay_tasks"])

  def task_loss(self, task: dict, spectral: dict, temperature: float):
    """(loss, α detached) of one task: smat.meta.tasks.expert_loss."""
    spec, loss_cfg = self.spec, self.spec["loss"]
    ways, scale = spec["episode"]["ways"], loss_cfg["cosine_scale"]
    support = model_input(task["support_images"], spec["backbone"], spec["augment"])
    query = model_input(task["query_images"], spec["backbone"], spec["augment"])
    y_s, y_q = task["support_labels"], task["query_labels"]

    # Router pass: θ_pre's support prototypes (no gradient) → router block → ℓ → α.
    with torch.no_grad():
      protos_pre = prototypes(self.features(self.theta_pre, support), y_s, ways)
    router_params = spectral_normalised(self.router, spectral)
    logits = expert_logits(router_params, protos_pre, spec["router"])
    alpha = interpolation_weights(logits, temperature)

    # Merge: every expert's sampled gates, weighted by α, mask the shared δ.
    merged = (alpha[:, None] * sample_gates(self.log_alpha, spec["experts"])).sum(0)
    theta = self.theta_pre + merged * self.delta

    # Inner step, first order: θ_task on the support; the head starts at the prototypes and
    # takes the same SGD step. The gradient is computed without a graph (not differentiated
    # through); the support pass's graph is kept, since the outer loss reaches it through the
    # prototypes.
    f_s = self.features(theta, support)
    protos = prototypes(f_s, y_s, ways)
    head_leaf = protos.detach().requires_grad_()
    support_ce = F.cross_entropy(cosine_logits(f_s, head_leaf, scale), y_s)
    g_theta, g_head = torch.autograd.grad(support_ce, (theta, head_leaf), retain_graph=True)
    adapted = theta - loss_cfg["inner_lr"] * g_theta
    head = (protos - loss_cfg["inner_lr"] * g_head).detach() + protos - protos.detach()

    # Student query pass: the adapted θ on the query, under the re-attached head.
    f_q = self.features(adapted, query)
    student = cosine_logits(f_q, head, scale)
    query_ce = F.cross_entropy(student, y_q)

    # Dense teacher: one SGD step of a detached copy of (θ', head) on the query CE, its
    # gradient taken back through the student pass's graph (kept for the outer backward),
    # then the teacher's own query pass.
    teacher_head_leaf = head.detach().requires_grad_()
    teacher_ce = F.cross_entropy(cosine_logits(f_q, teacher_head_leaf, scale), y_q)
    g_adapted, g_teacher_head = torch.autograd.grad(teacher_ce, (adapted, teacher_head_leaf),
                                                    retain_graph=True)
    with torch.no_grad():
      teacher = adapted - loss_cfg["teacher_lr"] * g_adapted
      teacher_logits = cosine_logits(self.features(teacher, query),
                                     head - loss_cfg["teacher_lr"] * g_teacher_head, scale)
      # θ_pre teacher: the frozen backbone on the query, with θ_pre's prototypes.
      pre_logits = cosine_logits(self.features(self.theta_pre, query), protos_pre, scale)

    kd = 0.5 * (distillation(student, teacher_logits, loss_cfg)
                + distillation(student, pre_logits, loss_cfg))
    loss = (loss_cfg["ce_weight"] * query_ce + loss_cfg["kd_weight"] * kd
            + loss_cfg["router_logit_weight"] * (logits ** 2).mean())
    return loss, alpha.detach()

  def sparsity_terms(self, alpha_mean: torch.Tensor):
    """(L_sparse + L_lagr, λ reset) on the deterministic masks (smat.meta.methods.smat)."""
    e = self.spec["experts"]
    tau = e["target_sparsity"]
    with torch.no_grad():
      deployed = deployed_sparsity(self.log_alpha, e)
      lam_reset = torch.where(deployed > tau, 0.0, self.lam)
    l_sparse = ((alpha_mean * lam_reset) * (tau - 1 + expected_l0(self.log_alpha, e))).sum()
    l_lagr = ((alpha_mean * (deployed - tau)) * self.lam).sum()
    return l_sparse + l_lagr, lam_reset

  def trainable(self) -> list[torch.Tensor]:
    return [self.delta, self.log_alpha, self.lam, *leaves(self.router)]

  def __call__(self, tasks: list[dict]) -> torch.Tensor:
    """One meta-training step on a meta-batch; returns the meta-batch loss."""
    for t in self.trainable():
      t.grad = None
    spectral = power_iteration(self.router, self.spectral)  # before the loss, as smat
    temperature = self.temperature()
    # Outer backward of each task's loss (÷ tasks: the mean) as soon as it is known.
    total, alphas = 0.0, []
    for task in tasks:
      loss, alpha = self.task_loss(task, spectral, temperature)
      (loss / len(tasks)).backward()
      total, alphas = total + loss.detach() / len(tasks), alphas + [alpha]
    sparsity_loss, lam_reset = self.sparsity_terms(torch.stack(alphas).mean(0))
    sparsity_loss.backward()
    total = total + sparsity_loss.detach()
    finite = torch.isfinite(total) and all(torch.isfinite(t.grad).all() for t in self.trainable())
    if finite:  # a non-finite loss or gradient leaves the state as it was
      self.update(lam_reset)
      self.spectral = spectral
    self.step_count += 1
    self.tasks_seen += len(tasks)
    return total

  def update(self, lam_reset: torch.Tensor) -> None:
    """The four groups' steps, λ reset before and the projections after."""
    o = self.spec["optim"]
    with torch.no_grad():
      self.lam.copy_(lam_reset)
    for group, lr in learning_rates(o, self.step_count).items():
      self.optimisers[group].param_groups[0]["lr"] = lr
    clip_by_global_norm([self.log_alpha], o["gate_clip"])
    clip_by_global_norm(leaves(self.router), o["router_clip"])
    for optimiser in self.optimisers.values():
      optimiser.step()
    e = self.spec["experts"]
    with torch.no_grad():
      self.log_alpha.clamp_(e["log_alpha_min"], e["log_alpha_max"])
      self.lam.clamp_(min=0.0)


def main() -> None:
  spec = json.loads(sys.argv[1])
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  step = SmatStep(spec)
  tasks = synthetic_tasks(spec["episode"], spec["backbone"]["image_size"])
  losses = [float(step(tasks)) for _ in range(spec["warmup"])]
  print(json.dumps({"ready": True, "torch": torch.__version__, "timm": timm.__version__,
                    "threads": torch.get_num_threads(), "warmup_losses": losses}), flush=True)
  for _ in sys.stdin:
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(spec["repeats"]):
      step(tasks)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "cpu": time.process_time() - cpu}), flush=True)


if __name__ == "__main__":
  main()
