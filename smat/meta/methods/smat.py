"""SMAT: sparse interpolated experts, θ = θ_pre + (Σ_k α_k z_k) ⊙ δ with hard-concrete gates z_k,
each expert's deployed sparsity held at τ by a Lagrangian (λ, one per expert)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from smat.meta import budget, experts, gates, router, tasks
from smat.meta.methods.base import Init, Method


@dataclasses.dataclass(frozen=True)
class SMAT(Method):

  def init(self, key, theta_pre) -> Init:
    """δ = 0, log_α ~ N(0, 0.5²), λ = 0."""
    hp = self.hp
    k_gates, k_router = jax.random.split(key)
    dim = jax.tree.leaves(theta_pre["cls_token"])[0].shape[-1]
    router_params, router_state = router.init(k_router, dim, hp.experts.num_experts)
    return Init({"delta": experts.init_delta(theta_pre),
                 "gates": experts.init_gates(k_gates, theta_pre, hp.experts.num_experts, hp.experts.structured,
                                             hp.experts.freeze_embeddings),
                 "lam": jnp.zeros((hp.experts.num_experts,)),
                 "router": router_params}, router_state)

  def task_params(self, params, theta_pre, alpha, key, probe):
    """Sampled gates, merged by α. (The sparsity the budget controls is that of the
    deterministic masks, measured once per step in `batch_loss`.)"""
    merged, sparsity = experts.sample_merged(key, params["gates"], alpha, theta_pre,
                                             self.hp.experts.gate_noise)
    return (experts.interpolate(theta_pre, params["delta"], merged), sparsity,
            experts.merged_density(merged, theta_pre))

  def batch_loss(self, loss, metrics, params, theta_pre):
    """+ the sparsity loss and the Lagrangian on the deployed (deterministic) masks."""
    tau, alpha = self.hp.experts.target_sparsity, metrics["alpha"].mean(0)
    deployed = experts.deployed_sparsity(params["gates"], theta_pre)
    lam = budget.reset(params["lam"], deployed, tau)
    expected_l0 = experts.expected_l0(params["gates"], theta_pre)
    l_sparse = budget.sparsity_loss(alpha, lam, expected_l0, tau)
    l_lagr = budget.lagrangian(alpha, params["lam"], deployed, tau)
    return loss + l_sparse + l_lagr, {
        "sparsity_loss": l_sparse, "lagrangian": l_lagr, "expert_sparsity": deployed,
        "expected_sparsity": 1.0 - expected_l0}

  def before_update(self, params, batch):
    """λ of experts whose deployed masks are sparser than τ reset to 0 before the step."""
    return {**params, "lam": budget.reset(params["lam"], batch["expert_sparsity"],
                                          self.hp.experts.target_sparsity)}

  def after_update(self, stepped, params, mask_state, probe_grads, step):
    """Projections: log_α into its range, λ ≥ 0."""
    stepped["gates"] = jax.tree.map(gates.clamp, stepped["gates"])
    stepped["lam"] = jnp.maximum(stepped["lam"], 0.0)
    return stepped, mask_state

  def zero_shot_task(self, params, theta_pre, router_params, episode, temp):
    """Deterministic gates merged by α = normalised sigmoid(ℓ / T)."""
    _, alpha, _ = tasks.route(router_params, theta_pre, episode, self.hp, temp)
    merged = experts.merge(alpha, experts.eval_masks(params["gates"]))
    return experts.interpolate(theta_pre, params["delta"], merged), alpha, merged

  def logged(self, params) -> dict:
    return {"lam": params["lam"]}
