"""Fine-tuned meta-test: adapt θ_task on each task's support, then predict its query.

Per task (smat.md "Meta-test"): collapse θ_task into one dense parameter set (θ_pre for Pre,
θ_pre + δ for PMF, the merged expert for SoftMerge and SMAT), then take `steps` optimiser steps
on the support: each step recomputes the ProtoNet prototypes on the clean support and takes the
cross-entropy of the augmented support (`augment.support_augment`) against them, so gradients
reach the backbone through both. The query is then classified by prototypes of the adapted
model. The whole adaptation is one `lax.scan`, vmapped over a batch of episodes and jitted once
per (adapter, episode shape).

What is trained is an *adapter*, a plugin of pure functions (init, init_state, features,
optimizer, restrict, observe); the backbone knows nothing of them:
  full      every backbone parameter, AdamW (weight decay 0.01)
  lora      rank-8 factors on the query and value projections (α 32, dropout 0.1), lr × 10; the
            backbone's Dense calls are intercepted, so LoRA at initialisation (B = 0) *is* θ_task
  sparse    the entries the task's merged SMAT mask m leaves non-zero (the rest stay fixed)
  random, map, influence, selfpruner
            a δ over θ_task masked by a `smat.sparsity` strategy at density 0.1, the strategy
            updated from (δ, ∂L/∂δ, step) after every step (`Strategic`; Self-Pruner with even
            per-block budgets: its search needs validation episodes a support set does not give)
  circuit   a δ on the weight slices of the support's circuit (edge attribution patching),
            rediscovered every 8 steps (`Circuit`)
An adapter's *state* (the selected entries, a strategy's scores) is carried through the steps
but never trained.

The learning rate is chosen per domain from `lrs` by mean query accuracy on the first
`search_episodes` episodes, which are then not reported (`search_lr`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smat import fewshot, protonet, sparsity
from smat.data import augment
from smat.data import episodes as ep
from smat.errors import SmatError
from smat.meta import experts, methods, router, tasks
from smat.models import vit

LEARNING_RATES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The adaptation loop shared by every adapter (the paper's values by default)."""

  steps: int = 50
  lrs: tuple[float, ...] = LEARNING_RATES
  search_episodes: int = 5
  augment_prob: float = 0.9
  translation: float = 0.125
  cosine_scale: float = protonet.COSINE_SCALE


class Task(NamedTuple):
  """What an adapter may look at besides its parameters: θ_task, the episode, the backbone's
  config and the entries of the task's merged SMAT mask (None without one)."""

  theta: dict
  episode: ep.Episode
  config: vit.ViTConfig
  selected: dict | None = None


# ----------------------------------------------------------------------------------------------
# Adapters: what is trained, how it enters the forward pass, with which optimiser.


@dataclasses.dataclass(frozen=True)
class Full:
  """Every backbone parameter, AdamW."""

  weight_decay: float = 0.01
  lr_scale: float = 1.0

  def init(self, theta, key):
    del key
    return theta

  def init_state(self, task: "Task"):
    return task.selected

  def features(self, theta, trainable, state, images, key, config):
    del theta, state, key
    return vit.forward(trainable, images, config)

  def optimizer(self, lr):
    return optax.adamw(lr * self.lr_scale, weight_decay=self.weight_decay)

  def restrict(self, updates, state):
    del state
    return updates

  def observe(self, state, task: "Task", trainable, grads, step):
    del task, trainable, grads, step
    return state


@dataclasses.dataclass(frozen=True)
class Sparse(Full):
  """Full fine-tuning restricted to the entries of the task's merged mask (SMAT runs only)."""

  needs_mask = True

  def restrict(self, updates, state):
    return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, state)


LORA_TARGETS = ("query", "value")


@dataclasses.dataclass(frozen=True)
class Strategic(Full):
  """θ = θ_task + stop_gradient(mask) ⊙ δ, δ from 0, the mask from a sparsity strategy that
  sees (δ, ∂L/∂δ, step) after each step (see `smat.sparsity` for each strategy's warm-up)."""

  strategy: object = None

  def init(self, theta, key):
    del key
    return jax.tree.map(jnp.zeros_like, theta)

  def init_state(self, task: "Task"):
    # The strategy's own key: fixed, so every episode and lr of a domain share a random mask.
    return self.strategy.init(task.theta, jax.random.key(0))

  def mask(self, state):
    return self.strategy.mask(state)

  def features(self, theta, trainable, state, images, key, config):
    del key
    return vit.forward(_masked(theta, self.mask(state), trainable), images, config)

  def observe(self, state, task: "Task", trainable, grads, step):
    del task
    return self.strategy.update(state, trainable, grads, step)


def _masked(theta, mask, delta):
  """θ + stop_gradient(m) ⊙ δ."""
  mask = jax.lax.stop_gradient(mask)
  return jax.tree.map(lambda p, m, d: p + m * d, theta, mask, delta)


@dataclasses.dataclass(frozen=True)
class Circuit(Strategic):
  """Circuit-tuning: δ restricted to the weight slices of the episode's circuit, found by edge
  attribution patching on the support (`smat.sparsity.circuit.Circuit`) at θ_task and
  rediscovered at θ_task + m ⊙ δ after every `strategy.every` steps; exactly the strategy's
  density of the entries are trainable."""

  def discover(self, theta, task: "Task"):
    """The circuit mask of `task`'s support at parameters `theta`."""
    scores = self.strategy.scores(theta, task.episode, task.config)
    return self.strategy.rediscover(theta, scores, task.config)

  def init_state(self, task: "Task"):
    return self.discover(task.theta, task)

  def observe(self, state, task: "Task", trainable, grads, step):
    del grads
    return jax.lax.cond((step + 1) % self.strategy.every == 0,
                        lambda: self.discover(_masked(task.theta, state, trainable), task),
                        lambda: state)


@dataclasses.dataclass(frozen=True)
class LoRA(Full):
  """h = W x + (α / r) · B A dropout(x) on the query and value projections of every block.

  A [L, in, r] ~ U(±1/√in) (PEFT's Kaiming-uniform), B [L, r, out] = 0; θ_task stays frozen.
  """

  rank: int = 8
  alpha: float = 32.0
  dropout: float = 0.1
  lr_scale: float = 10.0
  weight_decay: float = 0.01

  def init(self, theta, key):
    factors = {}
    for name, k in zip(LORA_TARGETS, jax.random.split(key, len(LORA_TARGETS))):
      depth, fan_in, fan_out = theta["blocks"]["attn"][name]["kernel"].shape
      bound = 1.0 / math.sqrt(fan_in)
      factors[name] = {"lora_a": jax.random.uniform(k, (depth, fan_in, self.rank),
                                                    minval=-bound, maxval=bound),
                       "lora_b": jnp.zeros((depth, self.rank, fan_out))}
    return factors

  def features(self, theta, trainable, state, images, key, config):
    del state
    attn = dict(theta["blocks"]["attn"])
    for name, factors in trainable.items():
      attn[name] = {**attn[name], **factors}
    params = {**theta, "blocks": {**theta["blocks"], "attn": attn}}
    scale, rate = self.alpha / self.rank, self.dropout

    def low_rank_path(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name != "__call__" or not module.has_variable("params", "lora_a"):
        return out
      x = args[0]
      if key is not None and rate > 0:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
      a, b = (module.get_variable("params", n).astype(x.dtype) for n in ("lora_a", "lora_b"))
      return out + (scale * (x @ a) @ b).astype(out.dtype)

    with nn.intercept_methods(low_rank_path):
      return vit.forward(params, images, config,
                         rngs=None if key is None else {"dropout": key})


STRATEGY_DENSITY = 0.1  # 1 − τ of ViT-S
STRATEGY_SCHEDULE = {"start": 10, "end": 40}  # of the 50 steps: warm-up, prune, survivors

ADAPTERS = {"full": Full(), "lora": LoRA(), "sparse": Sparse(),
            "random": Strategic(strategy=sparsity.Random(STRATEGY_DENSITY)),
            "map": Strategic(strategy=sparsity.MAP(STRATEGY_DENSITY, **STRATEGY_SCHEDULE)),
            "influence": Strategic(strategy=sparsity.Influence(STRATEGY_DENSITY,
                                                               **STRATEGY_SCHEDULE)),
            "selfpruner": Strategic(strategy=sparsity.SelfPruner(
                STRATEGY_DENSITY, start=STRATEGY_SCHEDULE["start"])),
            "circuit": Circuit(strategy=sparsity.Circuit(STRATEGY_DENSITY))}


# ----------------------------------------------------------------------------------------------
# One task.


class TaskModel(NamedTuple):
  """The arrays that give θ_task: θ_pre, trained params and router state (None for Pre)."""

  theta_pre: dict
  params: dict | None = None
  router_state: dict | None = None
  temperature: float = 1.0


def task_theta(model: TaskModel, episode, hp: tasks.Hyper | None):
  """(θ_task, merged mask m or None) of one episode; `hp` None means the frozen θ_pre."""
  if hp is None:
    return model.theta_pre, None
  router_params = (router.spectral_normalize(model.params["router"], model.router_state)
                   if model.router_state else None)
  theta, _, merged = methods.zero_shot_task(model.params, model.theta_pre, router_params,
                                            episode, hp, model.temperature)
  return theta, merged


def _prototypes(features, episode):
  return protonet.prototypes(features, episode.support_labels, episode.support_mask,
                             episode.class_mask.shape[-1])


def adapt(adapter, theta, selected, episode, key, lr, config: vit.ViTConfig,
          ft: FinetuneConfig):
  """(trained params, adapter state, support losses [steps]) after `ft.steps` steps."""
  support = vit.preprocess(episode.support_images, config)
  k_init, k_steps = jax.random.split(key)
  optimizer = adapter.optimizer(lr)

  def support_loss(trainable, state, key):
    k_aug, k_clean, k_augmented = jax.random.split(key, 3)
    features = lambda images, k: adapter.features(theta, trainable, state, images, k, config)
    protos = _prototypes(features(support, k_clean), episode)
    augmented = augment.support_augment(k_aug, support, ft.augment_prob, ft.translation)
    logits = protonet.cosine_logits(features(augmented, k_augmented), protos,
                                    episode.class_mask, ft.cosine_scale)
    return protonet.cross_entropy(logits, episode.support_labels, episode.support_mask)

  def step(carry, inputs):
    trainable, opt_state, state = carry
    index, key = inputs
    loss, grads = jax.value_and_grad(support_loss)(trainable, state, key)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, adapter.restrict(updates, state))
    return (new, opt_state, adapter.observe(state, task, trainable, grads, index)), loss

  trainable = adapter.init(theta, k_init)
  task = Task(theta, episode, config, selected)
  carry = (trainable, optimizer.init(trainable), adapter.init_state(task))
  (trainable, _, state), losses = jax.lax.scan(
      step, carry, (jnp.arange(ft.steps), jax.random.split(k_steps, ft.steps)))
  return trainable, state, losses


def query_accuracy(adapter, theta, trainable, state, episode, config: vit.ViTConfig,
                   ft: FinetuneConfig):
  """ProtoNet query accuracy of the adapted model (prototypes of the clean support)."""
  features = lambda images: adapter.features(theta, trainable, state,
                                             vit.preprocess(images, config), None, config)
  protos = _prototypes(features(episode.support_images), episode)
  logits = protonet.cosine_logits(features(episode.query_images), protos, episode.class_mask,
                                  ft.cosine_scale)
  return protonet.accuracy(logits, episode.query_labels, episode.query_mask)


@functools.partial(jax.jit, static_argnames=("adapter", "hp", "config", "ft"))
def finetune_batch(model: TaskModel, episodes, keys, lrs, *, adapter, hp, config, ft):
  """Query accuracies [B] (and support losses [B, steps]) of a stacked batch of episodes, each
  with its own key and learning rate."""

  def one(episode, key, lr):
    theta, merged = task_theta(model, episode, hp)
    selected = None if merged is None else experts.selected(merged, theta)
    trainable, state, losses = adapt(adapter, theta, selected, episode, key, lr, config, ft)
    return query_accuracy(adapter, theta, trainable, state, episode, config, ft), losses

  return jax.vmap(one)(episodes, keys, lrs)


# ----------------------------------------------------------------------------------------------
# Episodes of a domain: learning-rate search, then the reported ones.


def model_of(model) -> tuple[TaskModel, tasks.Hyper | None, vit.ViTConfig]:
  """(TaskModel, Hyper or None, ViTConfig) of a `metatrain.Run` or a (θ, ViTConfig) pair."""
  if isinstance(model, tuple):
    return TaskModel(model[0]), None, model[1]
  return (TaskModel(model.theta_pre, model.params, model.router_state, model.temperature),
          model.hp, model.hp.vit)


def episode_key(seed: int, index: int) -> jax.Array:
  """The adaptation key of episode `index`: the same for every method and learning rate."""
  return jax.random.fold_in(jax.random.key(seed), index)


def _jobs_accuracy(model, adapter, source, jobs, seed, ft, batch_size, progress=None):
  """Query accuracy of each (episode index, lr) job, in batches of `batch_size`."""
  from tqdm.auto import tqdm

  arrays, hp, config = model_of(model)
  if getattr(adapter, "needs_mask", False) and (hp is None or hp.method != "smat"):
    raise SmatError("sparse fine-tuning updates the entries of SMAT's merged mask: evaluate a "
                    "SMAT run, or use --adapt full or lora")
  accuracies = []
  batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
  for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False, unit="batch"):
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    episodes = ep.stack([source.episode(i) for i, _ in padded])
    keys = jnp.stack([episode_key(seed, source.first + i) for i, _ in padded])
    lrs = jnp.asarray([lr for _, lr in padded], jnp.float32)
    acc, _ = finetune_batch(arrays, episodes, keys, lrs, adapter=adapter, hp=hp, config=config,
                            ft=ft)
    accuracies.extend(np.asarray(acc)[:len(batch)].tolist())
  return accuracies


def search_lr(model, adapter, source, seed: int, ft: FinetuneConfig, batch_size: int = 1,
              progress: str | None = None) -> tuple[float, dict]:
  """(best lr, {lr: mean query accuracy %}) over the first `ft.search_episodes` episodes of
  `source`; ties go to the smaller lr. lr 0 leaves θ_task as it is, so it runs no steps."""
  means = {}
  for lr in ft.lrs:
    run = dataclasses.replace(ft, steps=0) if lr == 0 else ft
    jobs = [(i, lr) for i in range(ft.search_episodes)]
    label = progress and f"{progress} lr {lr:g}"
    acc = _jobs_accuracy(model, adapter, source, jobs, seed, run, batch_size, label)
    means[lr] = 100.0 * float(np.mean(acc))
  best = max(ft.lrs, key=lambda lr: (means[lr], -lr))
  return best, means


def evaluate_source(model, adapter, source, episodes: int, seed: int, ft: FinetuneConfig,
                    lr: float | None = None, batch_size: int = 1,
                    progress: str | None = None) -> dict:
  """Fine-tuned accuracy (%) with 95% CI over episodes `search_episodes …` of `source`.

  The first `ft.search_episodes` episodes pick the lr (unless `lr` is given) and are never
  reported, so the reported ones are those a zero-shot evaluation with the same reserve sees.
  """
  search = None
  if lr is None:
    lr, search = search_lr(model, adapter, source, seed, ft, batch_size,
                           progress and f"{progress} lr search")
  reported = dataclasses.replace(source, first=source.first + ft.search_episodes)
  run = dataclasses.replace(ft, steps=0) if lr == 0 else ft
  start = time.perf_counter()
  acc = _jobs_accuracy(model, adapter, reported, [(i, lr) for i in range(episodes)], seed, run,
                       batch_size, progress)
  result = fewshot.accuracy_summary([np.asarray(acc)], time.perf_counter() - start)
  result.update(lr=lr, lr_search=None if search is None else {str(k): v
                                                              for k, v in search.items()})
  return result
