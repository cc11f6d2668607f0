"""The pieces of one task's meta-training loss and zero-shot accuracy that the methods of
`smat.meta.methods` compose: routing, the inner step, the two teachers (`expert_loss`, for the
routed methods), ProtoNet's query loss (`protonet_loss`, P>M>F) and accuracy.

Everything here works on one padded episode (`smat.data.episodes.Episode` without the task
axis); the step vmaps it over the meta-batch. Shapes: support S, query Q, ways W, feature D.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from smat import protonet
from smat.data import augment
from smat.meta import gates, router
from smat.models import vit

METHODS = ("smat", "softmerge", "pmf")
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The task loss: the inner step, the two teachers' distillation, the ProtoNet head."""

  inner_lr: float = 1e-3
  teacher_lr: float = 5e-3
  kd_temperature: float = 2.0
  kd_direction: str = "reverse"  # "reverse": KL(student‖teacher) as the authors' code
  ce_weight: float = 0.75
  kd_weight: float = 0.25
  router_logit_weight: float = 1e-4
  cosine_scale: float = protonet.COSINE_SCALE

  def __post_init__(self):
    if self.kd_direction not in ("reverse", "forward"):
      raise ValueError(f"kd_direction {self.kd_direction!r}: use 'reverse' or 'forward'")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """The M experts and what masks them."""

  num_experts: int = 8
  target_sparsity: float = 0.9  # τ
  gate_noise: float = gates.REFERENCE_NOISE  # half width of u around 0.5 (the authors' 1e-6)
  # A `smat.sparsity` strategy giving the experts' masks in place of learned gates (None: SMAT's
  # hard-concrete gates). Its masks live in the trainable tree as `masks` [M, *P], never trained.
  mask_strategy: object = None
  # SMAT's learned gates: one gate per row/column group (`experts.init_gates`) in place of one
  # per weight; the embeddings without gates (their δ stays 0).
  structured: bool = False
  freeze_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule:
  """The router's softmax temperature over the tasks seen (`router.temperature`)."""

  start: float = 5.0
  floor: float = 0.5
  decay_tasks: float = 4000.0

  def __call__(self, tasks_seen) -> jax.Array:
    return router.temperature(tasks_seen, self.start, self.floor, self.decay_tasks)


@dataclasses.dataclass(frozen=True)
class Hyper:
  """A run's static hyper-parameters, by concern (hashable: part of the jitted step's
  identity). `Hyper.of` builds one from flat field names."""

  method: str = "smat"
  vit: vit.ViTConfig | None = None
  loss: LossConfig = LossConfig()
  experts: ExpertConfig = ExpertConfig()
  temperature: TemperatureSchedule = TemperatureSchedule()
  # Meta-training episodes' augmentation (random resized crop, colour jitter, flip), drawn on
  # device from each task's key; None: the episodes as loaded.
  augment: augment.AugmentConfig | None = None
  # Execution, not maths: the meta-batch runs in this many sequential chunks of tasks, each
  # recomputed in the backward pass: activation memory ÷ chunks for one more forward.
  task_chunks: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method {self.method!r} is not one of {METHODS}")

  @classmethod
  def of(cls, method: str = "smat", vit=None, augment=None, task_chunks: int = 1,
         temperature_start: float = 5.0, temperature_floor: float = 0.5,
         temperature_decay_tasks: float = 4000.0, **fields) -> "Hyper":
    """A Hyper from flat names: those of `LossConfig` and `ExpertConfig`, and the router's
    temperature_start / _floor / _decay_tasks."""
    names = lambda c: {f.name for f in dataclasses.fields(c)}
    unknown = set(fields) - names(LossConfig) - names(ExpertConfig)
    if unknown:
      raise TypeError(f"unknown hyper-parameters {sorted(unknown)}")
    pick = lambda c: c(**{k: v for k, v in fields.items() if k in names(c)})
    return cls(method, vit, pick(LossConfig), pick(ExpertConfig),
               TemperatureSchedule(temperature_start, temperature_floor, temperature_decay_tasks),
               augment, task_chunks)


def features(theta, images: jax.Array, config: vit.ViTConfig) -> jax.Array:
  """CLS features [N, D] of uint8 (or [0, 1] float) images."""
  return vit.forward(theta, vit.preprocess(images, config), config)


def augmented(episode, key, hp: Hyper):
  """The task's episode as meta-training sees it: augmented from its own stream of the task's
  key (fold_in 1; the gates and router split the key itself), or unchanged without `augment`."""
  if hp.augment is None:
    return episode
  return augment.augment_episode(jax.random.fold_in(key, 1), episode, hp.augment)


def logits_of(f: jax.Array, head: jax.Array, class_mask: jax.Array, hp: Hyper) -> jax.Array:
  return protonet.cosine_logits(f, head, class_mask, hp.loss.cosine_scale)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array, mask: jax.Array, t: float):
  """Mean over valid rows of KL(softmax(p/t) ‖ softmax(q/t))."""
  log_p, log_q = jax.nn.log_softmax(p_logits / t), jax.nn.log_softmax(q_logits / t)
  rows = (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
  weights = mask.astype(rows.dtype)
  return (rows * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def distillation(student: jax.Array, teacher: jax.Array, mask: jax.Array, hp: Hyper):
  """T² · KL with T = kd_temperature; "reverse" = KL(student‖teacher) (the authors' call)."""
  teacher = sg(teacher)
  pair = (student, teacher) if hp.loss.kd_direction == "reverse" else (teacher, student)
  return hp.loss.kd_temperature ** 2 * kl_divergence(*pair, mask, hp.loss.kd_temperature)


def inner_step(theta, episode, hp: Hyper):
  """First-order SGD step on the support; returns (θ', head, support CE, support accuracy).

  The head starts at the prototypes of θ and takes the same SGD step as θ (the authors treat
  it as a parameter). The step itself is not differentiated through; the head's value is the
  stepped one while its gradient flows through the prototypes (straight-through re-attach).
  The support forward is shared by the prototypes and the inner gradient.
  """
  ways = episode.class_mask.shape[-1]
  f_s, vjp = jax.vjp(lambda t: features(t, episode.support_images, hp.vit), theta)
  protos = protonet.prototypes(f_s, episode.support_labels, episode.support_mask, ways)

  def support_ce(f, head):
    logits = logits_of(f, head, episode.class_mask, hp)
    return protonet.cross_entropy(logits, episode.support_labels, episode.support_mask), logits

  (ce, logits), (g_f, g_head) = jax.value_and_grad(support_ce, (0, 1), has_aux=True)(
      sg(f_s), sg(protos))
  (g_theta,) = vjp(g_f)
  adapted = jax.tree.map(lambda p, g: p - hp.loss.inner_lr * sg(g), theta, g_theta)
  head = sg(protos - hp.loss.inner_lr * g_head) + protos - sg(protos)
  accuracy = protonet.accuracy(logits, episode.support_labels, episode.support_mask)
  return adapted, head, ce, accuracy


def dense_teacher(adapted, head, f_q, vjp_q, episode, hp: Hyper) -> jax.Array:
  """Query logits of a detached copy of (θ', head) after one SGD step on the query CE."""
  def query_ce(f, h):
    return protonet.cross_entropy(logits_of(f, h, episode.class_mask, hp),
                                  episode.query_labels, episode.query_mask)

  g_f, g_head = jax.grad(query_ce, (0, 1))(sg(f_q), sg(head))
  (g_theta,) = vjp_q(g_f)
  teacher = jax.tree.map(lambda p, g: sg(p - hp.loss.teacher_lr * g), adapted, g_theta)
  teacher_head = sg(head - hp.loss.teacher_lr * g_head)
  f_t = features(teacher, episode.query_images, hp.vit)
  return sg(logits_of(f_t, teacher_head, episode.class_mask, hp))


def route(router_params, theta_pre, episode, hp: Hyper, temp, key=None):
  """(expert logits ℓ [M], α [M], θ_pre support prototypes [W, D]) of one task."""
  ways = episode.class_mask.shape[-1]
  f_pre_s = sg(features(theta_pre, episode.support_images, hp.vit))
  protos_pre = protonet.prototypes(f_pre_s, episode.support_labels, episode.support_mask, ways)
  logits = router.expert_logits(router_params, protos_pre, episode.class_mask)
  alpha = router.interpolation_weights(router.scores(logits, temp, key))
  return logits, alpha, protos_pre


def expert_loss(theta_task, theta_pre, router_params, episode, key, temp, hp: Hyper):
  """Loss of one task of a routed method → (loss, metrics): route, θ_task, inner step, two
  teachers. `theta_task(α, key)` is the method's training θ_task → (θ_task, per-expert sparsity
  of sampled gates or None, merged mask density or None); `router_params` are normalised."""
  k_route, k_gates = jax.random.split(key)
  logits, alpha, protos_pre = route(router_params, theta_pre, episode, hp, temp, k_route)
  theta, sampled_sparsity, density = theta_task(alpha, k_gates)
  adapted, head, support_ce, support_acc = inner_step(theta, episode, hp)
  f_q, vjp_q = jax.vjp(lambda t: features(t, episode.query_images, hp.vit), adapted)
  student = logits_of(f_q, head, episode.class_mask, hp)
  ce = protonet.cross_entropy(student, episode.query_labels, episode.query_mask)
  teacher = dense_teacher(adapted, head, f_q, vjp_q, episode, hp)
  f_pre_q = sg(features(theta_pre, episode.query_images, hp.vit))
  pre = logits_of(f_pre_q, protos_pre, episode.class_mask, hp)
  kd = 0.5 * (distillation(student, teacher, episode.query_mask, hp)
              + distillation(student, pre, episode.query_mask, hp))
  logit_penalty = jnp.mean(logits ** 2)
  w = hp.loss
  loss = w.ce_weight * ce + w.kd_weight * kd + w.router_logit_weight * logit_penalty
  metrics = {
      "query_ce": ce, "kd": kd, "support_ce": support_ce, "support_accuracy": support_acc,
      "query_accuracy": protonet.accuracy(student, episode.query_labels, episode.query_mask),
      "teacher_accuracy": protonet.accuracy(teacher, episode.query_labels, episode.query_mask),
      "pre_accuracy": protonet.accuracy(pre, episode.query_labels, episode.query_mask),
      "router_logit_penalty": logit_penalty, "alpha": sg(alpha), "router_logits": sg(logits),
  }
  if density is not None:
    metrics["merged_density"] = density
  if sampled_sparsity is not None:
    metrics["sampled_sparsity"] = sampled_sparsity
  return loss, metrics


def protonet_loss(trainable, theta_pre, episode, hp: Hyper):
  """P>M>F: query CE of ProtoNet on θ_pre + δ → (loss, metrics)."""
  theta = jax.tree.map(jnp.add, theta_pre, trainable["delta"])
  ways = episode.class_mask.shape[-1]
  f_s = features(theta, episode.support_images, hp.vit)
  protos = protonet.prototypes(f_s, episode.support_labels, episode.support_mask, ways)
  logits = logits_of(features(theta, episode.query_images, hp.vit), protos, episode.class_mask,
                     hp)
  ce = protonet.cross_entropy(logits, episode.query_labels, episode.query_mask)
  return ce, {"query_ce": ce,
              "query_accuracy": protonet.accuracy(logits, episode.query_labels,
                                                  episode.query_mask)}


def protonet_accuracy(theta, episode, hp: Hyper) -> jax.Array:
  """Query accuracy of ProtoNet on θ (the zero-shot meta-test of one task), NaN when a real
  query's logit is not finite, so evaluation reports an error instead of a chance number."""
  ways = episode.class_mask.shape[-1]
  protos = protonet.prototypes(features(theta, episode.support_images, hp.vit),
                               episode.support_labels, episode.support_mask, ways)
  logits = logits_of(features(theta, episode.query_images, hp.vit), protos, episode.class_mask,
                     hp)
  finite = jnp.all(jnp.isfinite(logits) | ~episode.query_mask[:, None])
  accuracy = protonet.accuracy(logits, episode.query_labels, episode.query_mask)
  return jnp.where(finite, accuracy, jnp.nan)
