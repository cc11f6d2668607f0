"""SoftMerge: M dense experts merged by the router, θ = θ_pre + Σ_k α_k δ_k (no gates, τ = 0)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from smat.meta import experts, router, tasks
from smat.meta.methods.base import Init, Method


@dataclasses.dataclass(frozen=True)
class SoftMerge(Method):

  def init(self, key, theta_pre) -> Init:
    _, k_router = jax.random.split(key)
    dim = jax.tree.leaves(theta_pre["cls_token"])[0].shape[-1]
    router_params, router_state = router.init(k_router, dim, self.hp.experts.num_experts)
    deltas = jax.tree.map(lambda p: jnp.zeros((self.hp.experts.num_experts,) + p.shape), theta_pre)
    return Init({"delta": deltas, "router": router_params}, router_state)

  def task_params(self, params, theta_pre, alpha, key, probe):
    return experts.soft_merge(theta_pre, params["delta"], alpha), None, None

  def zero_shot_task(self, params, theta_pre, router_params, episode, temp):
    _, alpha, _ = tasks.route(router_params, theta_pre, episode, self.hp, temp)
    return experts.soft_merge(theta_pre, params["delta"], alpha), alpha, None
