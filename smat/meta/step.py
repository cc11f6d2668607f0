"""Trainable state, optimiser groups and the jitted meta-training step shared by every method.

Trainable state (θ_pre is an argument, never optimised or checkpointed):
  delta   δ, [P] per backbone leaf ([M, P] for SoftMerge)
  gates   log_α, [M, *G] per backbone leaf                     (smat)
  lam     λ [M]                                                  (smat)
  router  block, skill tokens, expert keys                       (smat, softmerge)
  masks   the experts' masks [M, *P] from a mask strategy (smat with `hp.experts.mask_strategy`, in
          place of gates and λ); the strategy's own state is `MetaState.mask_state`
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

from smat.meta import methods, router, schedules, tasks


class MetaState(NamedTuple):
  params: dict
  opt_state: optax.OptState
  router_state: dict  # spectral-norm (u, v) per router layer; {} for pmf
  step: jax.Array  # optimiser steps taken
  tasks_seen: jax.Array  # drives the router temperature
  bad_step: jax.Array  # first step whose loss or gradient was non-finite; -1 if none
  mask_state: object = ()  # per-expert state of the mask strategy [M, ...]; () without one


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


def init(key: jax.Array, theta_pre, hp: tasks.Hyper) -> methods.Init:
  """The method's initial (trainable params, router state, mask state)."""
  return methods.get(hp).init(key, theta_pre)


def init_params(key: jax.Array, theta_pre, hp: tasks.Hyper) -> tuple[dict, dict]:
  """(trainable params, router state) at initialisation (`init` without the mask state)."""
  params, router_state, _ = init(key, theta_pre, hp)
  return params, router_state


def init_state(params: dict, router_state: dict, optimizer, mask_state=()) -> MetaState:
  scalar = lambda v: jnp.full((), v, jnp.int32)
  return MetaState(params, optimizer.init(params), router_state, scalar(0), scalar(0), scalar(-1),
                   mask_state)


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
  """Meta-batch loss (the method's batch loss of the mean task loss), (per-task metrics,
  meta-batch metrics). `probe`: see `Method.prepare`. Each task's episode is augmented first
  when `hp.augment` says so."""
  method = methods.get(hp)
  theta_pre = jax.lax.stop_gradient(theta_pre)  # frozen: exactly zero gradient
  router_params = method.router_params(params, router_state)
  losses, metrics = over_tasks(
      lambda episode, key: method.task_loss(params, theta_pre, router_params,
                                            tasks.augmented(episode, key, hp), key, temp, probe),
      episodes, keys, hp.task_chunks)
  loss, batch = method.batch_loss(losses.mean(), metrics, params, theta_pre)
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
  method = methods.get(hp)
  params, mask_state, probe = method.prepare(state, router_state, theta_pre, episodes, temp)
  (loss, (metrics, batch)), (grads, probe_grads) = jax.value_and_grad(
      _loss, argnums=(0, 1), has_aux=True)(
          params, probe, router_state, theta_pre, episodes, keys, temp, hp)
  params = method.before_update(params, batch)
  updates, opt_state = optimizer.update(grads, state.opt_state, params)
  new_params, mask_state = method.after_update(optax.apply_updates(params, updates), params,
                                               mask_state, probe_grads, state.step)
  finite = _all_finite(loss, grads)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = MetaState(
      keep(new_params, state.params), keep(opt_state, state.opt_state),
      keep(router_state, state.router_state), state.step + 1,
      state.tasks_seen + num_tasks,
      jnp.where(finite | (state.bad_step >= 0), state.bad_step, state.step),
      keep(mask_state, state.mask_state))
  summary = {k: v.mean(0) for k, v in metrics.items()}
  summary.update(batch, loss=loss, grad_norm=optax.tree.norm(grads), temperature=temp,
                 finite=finite.astype(jnp.float32))
  if "alpha" in metrics:  # how often each expert weighs more than an even share
    summary["selected"] = (metrics["alpha"] > 1.0 / hp.experts.num_experts).mean(0)
  summary.update(method.logged(new_params))
  return new_state, summary


def zero_shot_batch(params, router_state, episodes, theta_pre, temp, *, hp: tasks.Hyper):
  """Zero-shot query accuracy [T] (and α [T, M] for routed methods) of a batch of episodes."""
  router_params = methods.get(hp).router_params(params, router_state) if router_state else None
  return jax.vmap(methods.zero_shot_accuracy, (None, None, None, 0, None, None))(
      params, theta_pre, router_params, episodes, hp, temp)


def jit_step(hp: tasks.Hyper, optimizer, out_sharding=None):
  """meta_train_step jitted with buffer donation; call as step(state, episodes, rng, θ_pre)."""
  return jax.jit(functools.partial(meta_train_step, hp=hp, optimizer=optimizer),
                 donate_argnums=0,
                 out_shardings=None if out_sharding is None else (out_sharding, out_sharding))
