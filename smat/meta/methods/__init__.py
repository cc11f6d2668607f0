"""The meta-training methods, one object each with the same few operations, so that
`smat.meta.step.meta_train_step` has no method branches and a new method is one new file.

Every method is a frozen dataclass over the static `Hyper` of its run (`get(hp)` builds it):

  init(key, θ_pre)                           → Init: trainable params, router and mask state
  prepare(state, router_state, θ_pre, episodes, temp)
                                             → (params, mask state, probe) this step's loss sees
  router_params(params, router_state)        → the router the tasks use (None without one)
  task_loss(params, θ_pre, router, episode, key, temp, probe) → (loss, metrics) of one task
  batch_loss(mean task loss, metrics, params, θ_pre) → (loss, batch metrics)
  before_update(params, batch)               → the params the optimiser steps from
  after_update(stepped, params, mask state, probe grads, step) → (params, mask state)
  zero_shot_task(params, θ_pre, router, episode, temp) → (θ_task, α or None, mask or None)
  logged(params)                             → extra values for the step's summary

  pmf         θ = θ_pre + δ                                     (`pmf.PMF`)
  softmerge   θ = θ_pre + Σ_k α_k δ_k                           (`softmerge.SoftMerge`)
  smat        θ = θ_pre + (Σ_k α_k z_k) ⊙ δ, learned gates z    (`smat.SMAT`)
  smat + a mask strategy: fixed masks m_k in place of z_k       (`masked.Masked`, or
              `masked.Rediscovered` when the strategy scores activations: circuits)
"""

from __future__ import annotations

from smat.meta.methods.base import Init, Method
from smat.meta.methods.masked import Masked, Rediscovered
from smat.meta.methods.pmf import PMF
from smat.meta.methods.smat import SMAT
from smat.meta.methods.softmerge import SoftMerge

__all__ = ["Init", "Method", "PMF", "SoftMerge", "SMAT", "Masked", "Rediscovered", "get",
           "zero_shot_task", "zero_shot_params", "zero_shot_accuracy"]


def get(hp) -> Method:
  """The method of a run's static hyper-parameters (`hp.method`, `hp.experts.mask_strategy`)."""
  if hp.method == "pmf":
    return PMF(hp)
  if hp.method == "softmerge":
    return SoftMerge(hp)
  if hp.experts.mask_strategy is None:
    return SMAT(hp)
  return Rediscovered(hp) if hasattr(hp.experts.mask_strategy, "rediscover") else Masked(hp)


def zero_shot_task(trainable, theta_pre, router_params, episode, hp, temp):
  """(θ_task, α or None, merged mask or None) of one task at meta-test (`Method.zero_shot_task`).
  The mask is where sparse fine-tuning updates (None for PMF and SoftMerge, which have none)."""
  return get(hp).zero_shot_task(trainable, theta_pre, router_params, episode, temp)


def zero_shot_params(trainable, theta_pre, router_params, episode, hp, temp):
  """(θ_task, α or None) of one task at meta-test."""
  theta, alpha, _ = zero_shot_task(trainable, theta_pre, router_params, episode, hp, temp)
  return theta, alpha


def zero_shot_accuracy(trainable, theta_pre, router_params, episode, hp, temp):
  """(query accuracy, α or None) of ProtoNet on θ_task: the zero-shot meta-test of one task
  (NaN when θ_task's logits are not finite, so evaluation reports an error)."""
  from smat.meta import tasks

  theta, alpha = zero_shot_params(trainable, theta_pre, router_params, episode, hp, temp)
  return tasks.protonet_accuracy(theta, episode, hp), alpha
