"""SMAT with a `smat.sparsity` mask strategy in place of learned gates: θ_task =
θ_pre + Σ_k α_k m_k ⊙ δ, the masks m_k [M, *P] fixed inputs of the loss (in the trainable tree as
`masks`, never trained) that each expert's strategy sets after every step.

`Masked` strategies score (δ, each expert's share of ∂L/∂δ, step); `Rediscovered` ones (circuits)
score activations, every `strategy.every` steps before the step's loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from smat.meta import experts, router, tasks
from smat.meta.methods.base import Init, Method

sg = jax.lax.stop_gradient


def expert_masks(strategy, mask_state):
  return jax.vmap(strategy.mask)(mask_state)


@dataclasses.dataclass(frozen=True)
class Masked(Method):

  @property
  def strategy(self):
    return self.hp.experts.mask_strategy

  def init_mask_state(self, key, theta_pre):
    """The strategy's state for each expert [M, ...], drawn from the branch of the key that
    learned gates draw from."""
    keys = jax.random.split(jax.random.split(key)[0], self.hp.experts.num_experts)
    return jax.vmap(self.strategy.init, (None, 0))(experts.init_delta(theta_pre), keys)

  def init(self, key, theta_pre) -> Init:
    _, k_router = jax.random.split(key)
    dim = jax.tree.leaves(theta_pre["cls_token"])[0].shape[-1]
    router_params, router_state = router.init(k_router, dim, self.hp.experts.num_experts)
    mask_state = self.init_mask_state(key, theta_pre)
    # A strategy's `mask` may return its state's own array; the step donates params and state,
    # so they must not share a buffer.
    masks = jax.tree.map(jnp.copy, expert_masks(self.strategy, mask_state))
    return Init({"delta": experts.init_delta(theta_pre), "masks": masks,
                 "router": router_params}, router_state, mask_state)

  def prepare(self, state, router_state, theta_pre, episodes, temp):
    return state.params, state.mask_state, jax.tree.map(jnp.zeros_like, state.params["masks"])

  def task_params(self, params, theta_pre, alpha, key, probe):
    """θ_pre + Σ_k α_k m_k ⊙ (δ + probe_k): the zero `probe` [M, *P] exists only so that its
    gradient is each expert's share ∂L/∂δ_k (None for circuits, which score activations)."""
    masks, delta = sg(params["masks"]), params["delta"]
    if probe is not None:  # δ_k = δ + probe_k, [M, *P]
      delta = jax.tree.map(jnp.add, delta, probe)
    theta = jax.tree.map(lambda p, d, m: p + jnp.tensordot(alpha, m * d, axes=1),
                         theta_pre, delta, masks)
    merged = experts.merge(alpha, masks)
    return theta, None, experts.merged_density(merged, theta_pre)

  def batch_loss(self, loss, metrics, params, theta_pre):
    return loss, {"expert_sparsity": experts.sparsity(params["masks"], theta_pre)}

  def after_update(self, stepped, params, mask_state, probe_grads, step):
    """Each expert's strategy sees (δ, its share of ∂L/∂δ, step)."""
    mask_state = jax.vmap(self.strategy.update, (0, None, 0, None))(
        mask_state, params["delta"], probe_grads, step)
    stepped["masks"] = expert_masks(self.strategy, mask_state)
    return stepped, mask_state

  def zero_shot_task(self, params, theta_pre, router_params, episode, temp):
    _, alpha, _ = tasks.route(router_params, theta_pre, episode, self.hp, temp)
    merged = experts.merge(alpha, params["masks"])
    return experts.interpolate(theta_pre, params["delta"], merged), alpha, merged


@dataclasses.dataclass(frozen=True)
class Rediscovered(Masked):
  """Circuit-tuning: the masks come from activations, rediscovered before the step's loss."""

  def prepare(self, state, router_state, theta_pre, episodes, temp):
    mask_state = jax.lax.cond(
        state.step % self.strategy.every == 0,
        lambda: self.rediscover(state.params, router_state, theta_pre, episodes, temp),
        lambda: state.mask_state)
    return {**state.params, "masks": expert_masks(self.strategy, mask_state)}, mask_state, None

  def rediscover(self, params, router_state, theta_pre, episodes, temp):
    """Each expert's next strategy state from the meta-batch's activations: the edge scores of
    every task at its zero-shot θ_task (current masks, deterministic α), averaged per expert
    with weights α_tk, so an expert's circuit is that of the tasks routed to it."""
    router_params = router.spectral_normalize(params["router"], router_state)

    def task_scores(episode):
      theta, alpha, _ = self.zero_shot_task(params, theta_pre, router_params, episode, temp)
      return alpha, self.strategy.scores(theta, episode, self.hp.vit)

    alpha, scores = jax.vmap(task_scores)(episodes)  # [T, M], [T, U, V]
    per_expert = jnp.einsum("tm,tuv->muv", alpha, scores) / alpha.sum(0)[:, None, None]
    return jax.vmap(self.strategy.rediscover, (None, 0, None))(params["delta"], per_expert,
                                                              self.hp.vit)

  def after_update(self, stepped, params, mask_state, probe_grads, step):
    stepped["masks"] = expert_masks(self.strategy, mask_state)
    return stepped, mask_state
