"""P>M>F: dense meta-tuning of the backbone, θ = θ_pre + δ, trained by ProtoNet's query loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from smat.meta import experts, tasks
from smat.meta.methods.base import Init, Method


@dataclasses.dataclass(frozen=True)
class PMF(Method):

  def init(self, key, theta_pre) -> Init:
    return Init({"delta": experts.init_delta(theta_pre)}, {})

  def router_params(self, params, router_state):
    return None

  def task_loss(self, params, theta_pre, router_params, episode, key, temp, probe):
    return tasks.protonet_loss(params, theta_pre, episode, self.hp)

  def zero_shot_task(self, params, theta_pre, router_params, episode, temp):
    return jax.tree.map(jnp.add, theta_pre, params["delta"]), None, None
