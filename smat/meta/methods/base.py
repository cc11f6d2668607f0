"""What every meta-training method does, with the defaults of the expert methods: a routed θ_task
per task, trained by `tasks.expert_loss` (inner step, two teachers)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from smat.meta import router, tasks


class Init(NamedTuple):
  params: dict  # the trainable tree: delta, and gates/lam, masks or router by method
  router_state: dict  # spectral-norm (u, v) per router layer; {} without a router
  mask_state: object = ()  # per-expert state of a mask strategy [M, ...]; () without one


@dataclasses.dataclass(frozen=True)
class Method:
  """A meta-training method over the static hyper-parameters `hp` of its run."""

  hp: tasks.Hyper

  def init(self, key, theta_pre) -> Init:
    raise NotImplementedError

  def prepare(self, state, router_state, theta_pre, episodes, temp):
    """(params, mask state, probe) of this step's loss; probe: zeros whose gradient is each
    expert's share of ∂L/∂δ (gradient-scored mask strategies), else None."""
    return state.params, state.mask_state, None

  def router_params(self, params, router_state):
    return router.spectral_normalize(params["router"], router_state)

  def task_params(self, params, theta_pre, alpha, key, probe):
    """Training θ_task → (θ_task, per-expert sparsity of sampled gates or None, merged mask
    density or None)."""
    raise NotImplementedError

  def task_loss(self, params, theta_pre, router_params, episode, key, temp, probe):
    theta_task = lambda alpha, k: self.task_params(params, theta_pre, alpha, k, probe)
    return tasks.expert_loss(theta_task, theta_pre, router_params, episode, key, temp, self.hp)

  def batch_loss(self, loss, metrics, params, theta_pre):
    """The meta-batch loss from the mean task loss, and the batch's own metrics."""
    return loss, {}

  def before_update(self, params, batch):
    return params

  def after_update(self, stepped, params, mask_state, probe_grads, step):
    """The params and mask state after the optimiser's step (projections, new masks)."""
    return stepped, mask_state

  def zero_shot_task(self, params, theta_pre, router_params, episode, temp):
    raise NotImplementedError

  def logged(self, params) -> dict:
    return {}
