"""Learning-rate schedules of the meta-training optimiser groups (config `optim.schedule`).

  "epoch"  the authors' code (the default): one warm-up/cosine multiplier, stepped once per
           epoch, on every group (δ, gate logits, λ, router):
             m(e) = e / W                            for e < W   (W = warmup_epochs)
             m(e) = ½ (1 + cos(π · (e − W) / (H − W)))   after    (H = cosine_epochs, the horizon)
           i.e. HF's cosine-with-warm-up evaluated at the epoch index, so a 25-epoch run with
           H = 50 ends at m(24) ≈ 0.62, not at the floor. In epoch 0 δ, the gates and λ (the
           authors' main optimiser) run at `first_epoch_lr` (1e-6) and the router at m(0) = 0.
           Past the horizon m stays 0 (HF's formula would rise again).
  "step"   δ only, per step: linear warm-up from `warmup_lr` over `warmup_epochs`, cosine decay to
           `min_lr` at the end of this run; the other groups at their constant lr.

Each schedule is a function of the group's update count, which equals the meta-training step.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

SCHEDULES = ("epoch", "step")
GROUPS = ("delta", "gates", "lam", "router")
MAIN_GROUPS = ("delta", "gates", "lam")  # the authors' first optimiser; the router has its own


def epoch_multiplier(epoch, warmup_epochs: int, horizon_epochs: int):
  """m(e) of the "epoch" schedule (works on ints and arrays)."""
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = epoch / max(warmup_epochs, 1)
  progress = jnp.clip((epoch - warmup_epochs) / max(horizon_epochs - warmup_epochs, 1), 0.0, 1.0)
  cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(epoch < warmup_epochs, warm, cosine)


def _epoch_schedule(peak: float, optim, steps_per_epoch: int, first_epoch_lr) -> optax.Schedule:
  def schedule(count):
    epoch = count // steps_per_epoch
    lr = peak * epoch_multiplier(epoch, optim.warmup_epochs, optim.cosine_epochs)
    return lr if first_epoch_lr is None else jnp.where(epoch == 0, first_epoch_lr, lr)
  return schedule


def peak_lrs(optim) -> dict[str, float]:
  return {"delta": optim.delta_lr, "gates": optim.gate_lr, "lam": optim.lambda_lr,
          "router": optim.router_lr}


def group_schedules(optim, steps_per_epoch: int, total_steps: int) -> dict:
  """{group: lr schedule, or a constant lr} for the four optimiser groups under
  `optim.schedule`."""
  peaks = peak_lrs(optim)
  if optim.schedule == "epoch":
    first = optim.first_epoch_lr if optim.first_epoch_lr >= 0 else None
    return {g: _epoch_schedule(peak, optim, steps_per_epoch, first if g in MAIN_GROUPS else None)
            for g, peak in peaks.items()}
  if optim.schedule == "step":
    warmup = steps_per_epoch * optim.warmup_epochs
    delta = optax.warmup_cosine_decay_schedule(
        optim.warmup_lr, optim.delta_lr, warmup, max(total_steps, warmup + 1),
        end_value=optim.min_lr)
    return {"delta": delta, **{g: peaks[g] for g in GROUPS[1:]}}
  raise ValueError(f"optim.schedule={optim.schedule!r}: use one of {SCHEDULES}")
