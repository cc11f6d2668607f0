"""Trainable state, optimiser groups and the jitted meta-training step shared by every method.

Trainable state (θ_pre is an argument, never optimised or checkpointed):
  delta   δ, [P] per backbone leaf ([M, P] for SoftMerge)
  gates   log_α, [M, *G] per backbone leaf                     (smat)
  lam     λ [M]                                                  (smat)
  router  block, skill tokens, expert keys                       (smat, softmerge)
  masks   the experts' masks [M, *P] from a mask strategy (smat with `hp.mask_strategy`, in
          place of gates and λ); the strategy's own state is `MetaState.sparsity`
Optimiser groups (one `optax.multi_transform` from the top-level key):
  delta   weight decay + SGD momentum
  gates   global-norm clip + plain SGD (lr 1e6 drives gates to 0/1)
  lam     plain SGD on L_lagr (= ascent on the violation), no clipping
  router  global-norm clip + AdamW
  masks   none (set by the strategy after each step)
each with its learning-rate schedule from `smat.meta.schedules`.
The sparsity the Lagrangian controls is that of the deterministic masks meta-test uses
(`experts.deployed_sparsity`, once per step), whatever the training gates' noise.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from smat.meta import budget, experts, gates, router, schedules, tasks


class MetaState(NamedTuple):
  params: dict
  opt_state: optax.OptState
  router_state: dict  # spectral-norm (u, v) per router layer; {} for pmf
  step: jax.Array  # optimiser steps taken
  tasks_seen: jax.Array  # drives the router temperature
  bad_step: jax.Array  # first step whose loss or gradient was non-finite; -1 if none
  sparsity: object = ()  # per-expert state of the mask strategy [M, ...]; () without one


def make_optimizer(optim, steps_per_epoch: int, total_steps: int,
                   masks: bool = False) -> optax.GradientTransformation:
  """The four parameter groups of SMAT with their `schedules.group_schedules` (a method uses
  the groups its state has), and with `masks` the never-trained masks of a mask strategy."""
  lr = schedules.group_schedules(optim, steps_per_epoch, total_steps)
  groups = {
      "delta": optax.chain(optax.add_decayed_weights(optim.delta_weight_decay),
                           optax.sgd(lr["delta"], momentum=optim.delta_momentum or None)),
      "gates": optax.chain(optax.clip_by_global_norm(optim.gate_clip), optax.sgd(lr["gates"])),
      "lam": optax.sgd(lr["lam"]),
      "router": optax.chain(optax.clip_by_global_norm(optim.router_clip),
                            optax.adamw(lr["router"], weight_decay=optim.router_weight_decay)),
  }
  if masks:
    groups["masks"] = optax.set_to_zero()
  labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
  return optax.multi_transform(groups, labels)


def init_params(key: jax.Array, theta_pre, hp: tasks.Hyper, structured: bool = False,
                freeze_embeddings: bool = False) -> tuple[dict, dict]:
  """(trainable params, router state) at initialisation: δ = 0, log_α ~ N(0, 0.5²), λ = 0 (or,
  with a mask strategy, its initial masks in place of log_α and λ)."""
  k_gates, k_router = jax.random.split(key)
  if hp.method == "pmf":
    return {"delta": experts.init_delta(theta_pre)}, {}
  dim = jax.tree.leaves(theta_pre["cls_token"])[0].shape[-1]
  router_params, router_state = router.init(k_router, dim, hp.num_experts)
  if hp.method == "softmerge":
    deltas = jax.tree.map(lambda p: jnp.zeros((hp.num_experts,) + p.shape), theta_pre)
    return {"delta": deltas, "router": router_params}, router_state
  if hp.mask_strategy is not None:
    return {"delta": experts.init_delta(theta_pre),
            "masks": expert_masks(hp.mask_strategy, init_sparsity(key, theta_pre, hp)),
            "router": router_params}, router_state
  return {"delta": experts.init_delta(theta_pre),
          "gates": experts.init_gates(k_gates, theta_pre, hp.num_experts, structured,
                                      freeze_embeddings),
          "lam": jnp.zeros((hp.num_experts,)),
          "router": router_params}, router_state


def init_sparsity(key: jax.Array, theta_pre, hp: tasks.Hyper):
  """The mask strategy's state for each expert [M, ...], () without one. Called with
  `init_params`'s key (it draws from the same branch as the gates), so the two agree."""
  if hp.mask_strategy is None:
    return ()
  keys = jax.random.split(jax.random.split(key)[0], hp.num_experts)
  return jax.vmap(hp.mask_strategy.init, (None, 0))(experts.init_delta(theta_pre), keys)


def expert_masks(strategy, sparsity_state):
  return jax.vmap(strategy.mask)(sparsity_state)


def init_state(params: dict, router_state: dict, optimizer, sparsity=()) -> MetaState:
  scalar = lambda v: jnp.full((), v, jnp.int32)
  return MetaState(params, optimizer.init(params), router_state, scalar(0), scalar(0), scalar(-1),
                   sparsity)


def _task_keys(key: jax.Array, count: int) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))


def over_tasks(task_fn, episodes, keys, chunks: int = 1):
  """task_fn(episode, key) over the meta-batch's task axis: vmapped at once (chunks = 1), or in
  `chunks` sequential steps, each vmapped over every chunks-th task and recomputed in the
  backward pass, so one step's activations are live at a time. Strided chunks keep a task axis
  split over devices split: every device runs its own tasks in every step."""
  if chunks == 1:
    return jax.vmap(task_fn)(episodes, keys)
  to_chunks = lambda x: jnp.swapaxes(x.reshape(-1, chunks, *x.shape[1:]), 0, 1)
  from_chunks = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])
  chunk_fn = jax.checkpoint(jax.vmap(task_fn))
  out = jax.lax.map(lambda xs: chunk_fn(*xs), jax.tree.map(to_chunks, (episodes, keys)))
  return jax.tree.map(from_chunks, out)


def _loss(params, probe, router_state, theta_pre, episodes, keys, temp, hp: tasks.Hyper):
  """Meta-batch loss (mean over tasks), (per-task metrics, meta-batch metrics). `probe`: zeros
  [M, *P] whose gradient is each expert's share of ∂L/∂δ (gradient-scored mask strategies),
  else None. Each task's episode is augmented first when `hp.augment` says so."""
  theta_pre = jax.lax.stop_gradient(theta_pre)  # frozen: exactly zero gradient
  if hp.method == "pmf":
    losses, metrics = over_tasks(
        lambda episode, key: tasks.protonet_loss(
            params, theta_pre, tasks.augmented(episode, key, hp), hp), episodes, keys,
        hp.task_chunks)
    return losses.mean(), (metrics, {})
  router_params = router.spectral_normalize(params["router"], router_state)
  losses, metrics = over_tasks(
      lambda episode, key: tasks.expert_loss(params, theta_pre, router_params,
                                             tasks.augmented(episode, key, hp), key, temp, hp,
                                             probe), episodes, keys, hp.task_chunks)
  loss, batch = losses.mean(), {}
  if "masks" in params:
    batch["expert_sparsity"] = experts.sparsity(params["masks"], theta_pre)
  if "gates" in params:
    tau, alpha = hp.target_sparsity, metrics["alpha"].mean(0)
    deployed = experts.deployed_sparsity(params["gates"], theta_pre)
    lam = budget.reset(params["lam"], deployed, tau)
    expected_l0 = experts.expected_l0(params["gates"], theta_pre)
    l_sparse = budget.sparsity_loss(alpha, lam, expected_l0, tau)
    l_lagr = budget.lagrangian(alpha, params["lam"], deployed, tau)
    loss = loss + l_sparse + l_lagr
    batch = {"sparsity_loss": l_sparse, "lagrangian": l_lagr, "expert_sparsity": deployed,
             "expected_sparsity": 1.0 - expected_l0}
  return loss, (metrics, batch)


def _all_finite(*trees) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]))


def meta_train_step(state: MetaState, episodes, rng: jax.Array, theta_pre, *,
                    hp: tasks.Hyper, optimizer) -> tuple[MetaState, dict]:
  """One update on a meta-batch of tasks (episodes carry a leading task axis).

  Task t draws its randomness from fold_in(fold_in(rng, step), t), so a run resumed from a
  checkpoint, or split over any number of devices, draws the same numbers. A non-finite loss
  or gradient leaves the state unchanged and records the step in `bad_step`.
  """
  num_tasks = episodes.class_mask.shape[0]
  keys = _task_keys(jax.random.fold_in(rng, state.step), num_tasks)
  temp = hp.temperature(state.tasks_seen)
  router_state = (router.power_iteration(state.params["router"], state.router_state)
                  if state.router_state else state.router_state)
  strategy = hp.mask_strategy if hp.method == "smat" else None
  params, sparsity = state.params, state.sparsity
  from_activations = hasattr(strategy, "rediscover")
  if from_activations:  # circuits: scores from activations, before this step's loss
    sparsity = jax.lax.cond(
        state.step % strategy.every == 0,
        lambda: rediscover(state.params, router_state, theta_pre, episodes, temp, hp),
        lambda: state.sparsity)
    params = {**params, "masks": expert_masks(strategy, sparsity)}
  probe = (None if strategy is None or from_activations
           else jax.tree.map(jnp.zeros_like, params["masks"]))
  (loss, (metrics, batch)), (grads, expert_grads) = jax.value_and_grad(
      _loss, argnums=(0, 1), has_aux=True)(
          params, probe, router_state, theta_pre, episodes, keys, temp, hp)
  if "lam" in params:  # reset λ of experts whose deployed masks are sparser than τ, then step
    params = {**params, "lam": budget.reset(params["lam"], batch["expert_sparsity"],
                                            hp.target_sparsity)}
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if "gates" in new_params:  # projections: log_α into its range, λ ≥ 0
    new_params["gates"] = jax.tree.map(gates.clamp, new_params["gates"])
    new_params["lam"] = jnp.maximum(new_params["lam"], 0.0)
  if strategy is not None:  # each expert's strategy sees (δ, its share of ∂L/∂δ, step)
    if not from_activations:
      sparsity = jax.vmap(strategy.update, (0, None, 0, None))(
          sparsity, params["delta"], expert_grads, state.step)
    new_params["masks"] = expert_masks(strategy, sparsity)
  finite = _all_finite(loss, grads)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = MetaState(
      keep(new_params, state.params), keep(opt_state, state.opt_state),
      keep(router_state, state.router_state), state.step + 1,
      state.tasks_seen + num_tasks,
      jnp.where(finite | (state.bad_step >= 0), state.bad_step, state.step),
      keep(sparsity, state.sparsity))
  summary = {k: v.mean(0) for k, v in metrics.items()}
  summary.update(batch, loss=loss, grad_norm=optax.tree.norm(grads), temperature=temp,
                 finite=finite.astype(jnp.float32))
  if "alpha" in metrics:  # how often each expert weighs more than an even share
    summary["selected"] = (metrics["alpha"] > 1.0 / hp.num_experts).mean(0)
  if "lam" in new_params:
    summary["lam"] = new_params["lam"]
  return new_state, summary


def rediscover(params, router_state, theta_pre, episodes, temp, hp: tasks.Hyper):
  """Each expert's next strategy state from the meta-batch's activations (circuit-tuning): the
  edge scores of every task at its zero-shot θ_task (current masks, deterministic α), averaged
  per expert with weights α_tk, so an expert's circuit is that of the tasks routed to it."""
  strategy = hp.mask_strategy
  router_params = router.spectral_normalize(params["router"], router_state)

  def task_scores(episode):
    theta, alpha, _ = tasks.zero_shot_task(params, theta_pre, router_params, episode, hp, temp)
    return alpha, strategy.scores(theta, episode, hp.vit)

  alpha, scores = jax.vmap(task_scores)(episodes)  # [T, M], [T, U, V]
  per_expert = jnp.einsum("tm,tuv->muv", alpha, scores) / alpha.sum(0)[:, None, None]
  return jax.vmap(strategy.rediscover, (None, 0, None))(params["delta"], per_expert, hp.vit)


def zero_shot_batch(params, router_state, episodes, theta_pre, temp, *, hp: tasks.Hyper):
  """Zero-shot query accuracy [T] (and α [T, M] for expert methods) of a batch of episodes."""
  router_params = (router.spectral_normalize(params["router"], router_state)
                   if router_state else None)
  return jax.vmap(tasks.zero_shot_accuracy, (None, None, None, 0, None, None))(
      params, theta_pre, router_params, episodes, hp, temp)


def jit_step(hp: tasks.Hyper, optimizer, out_sharding=None):
  """meta_train_step jitted with buffer donation; call as step(state, episodes, rng, θ_pre)."""
  return jax.jit(functools.partial(meta_train_step, hp=hp, optimizer=optimizer),
                 donate_argnums=0,
                 out_shardings=None if out_sharding is None else (out_sharding, out_sharding))
