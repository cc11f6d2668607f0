"""Self-Pruner budgets for δ's mask (use (a) of sparsity-patterns.md): per-group densities
(one group per transformer block, then one for every other tensor), searched by
`evolution.search`, with the top entries of |δ| inside each group.

The rates' size-weighted mean is fixed, so the total kept count is the budget; the rounding of
per-group counts is settled by largest remainders, so the mask holds exactly `kept_count`.
δ = 0 start: a dense warm-up until `start`, where |δ| is scored once and the mask frozen.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smat.models import layout
from smat.sparsity import common


def group_ids(params, exclude: tuple[str, ...] = ()) -> tuple[list[np.ndarray], int]:
  """(per leaf: int array of its entries' group, number of groups). Block leaves [L, ...] put
  slice l in group l; every other leaf is in group L. Excluded entries get group −1."""
  depth = layout.depth(params)
  ids = []
  for (name, p), ok in zip(layout.named_leaves(params), common.eligible(params, exclude)):
    if not ok:
      ids.append(np.full(p.shape, -1))
    elif layout.is_block(name):
      ids.append(np.broadcast_to(np.arange(depth).reshape((-1,) + (1,) * (p.ndim - 1)), p.shape))
    else:
      ids.append(np.full(p.shape, depth))
  return ids, depth + 1


def group_sizes(params, exclude: tuple[str, ...] = ()) -> np.ndarray:
  ids, count = group_ids(params, exclude)
  flat = np.concatenate([i.ravel() for i in ids])
  return np.bincount(flat[flat >= 0], minlength=count)


def group_counts(params, density: float, rates, exclude: tuple[str, ...] = ()) -> np.ndarray:
  """Kept entries per group: rates × sizes rounded by largest remainder to sum to the budget."""
  sizes = group_sizes(params, exclude)
  kept = common.kept_count(params, density, exclude)
  ideal = np.asarray(rates, np.float64) * sizes
  ideal *= kept / max(ideal.sum(), 1e-12)  # the rates' mean may drift by float error
  counts = np.minimum(np.floor(ideal).astype(np.int64), sizes)
  for i in np.argsort(-(ideal - counts), kind="stable"):
    if counts.sum() >= kept:
      break
    if counts[i] < sizes[i]:
      counts[i] += 1
  if counts.sum() != kept:
    raise ValueError(f"rates {list(rates)} cannot place {kept} entries in groups of {sizes}")
  return counts


def grouped_top_k(scores, counts, exclude: tuple[str, ...] = ()):
  """{0, 1} tree: the `counts[g]` highest-scoring entries of each group g (ties: tree order)."""
  ids, _ = group_ids(scores, exclude)
  flat = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) for s in jax.tree.leaves(scores)])
  group = jnp.asarray(np.concatenate([i.ravel() for i in ids]))
  order = jnp.lexsort((-flat, group))  # by group, then by descending score (stable)
  sorted_group = group[order]
  starts = jnp.searchsorted(sorted_group, sorted_group, side="left")
  rank = jnp.arange(flat.size) - starts
  quota = jnp.concatenate([jnp.asarray(counts, jnp.int32), jnp.zeros((1,), jnp.int32)])
  keep_sorted = (sorted_group >= 0) & (rank < quota[sorted_group])
  keep = jnp.zeros(flat.shape, jnp.float32).at[order].set(keep_sorted.astype(jnp.float32))
  return common.unflatten_like(keep, scores)


class BudgetState(NamedTuple):
  mask: dict


@dataclasses.dataclass(frozen=True)
class SelfPruner:
  density: float = 0.1
  rates: tuple[float, ...] | None = None  # per group (blocks, then the rest); None: uniform
  start: int = 10
  exclude: tuple[str, ...] = ()

  def counts(self, params) -> np.ndarray:
    sizes = group_sizes(params, self.exclude)
    rates = (np.full(len(sizes), 1.0) if self.rates is None else np.asarray(self.rates))
    if len(rates) != len(sizes):
      raise ValueError(f"SelfPruner has {len(rates)} rates but δ has {len(sizes)} groups "
                       f"({len(sizes) - 1} blocks and the rest)")
    return group_counts(params, self.density, rates, self.exclude)

  def init(self, params, key) -> BudgetState:
    del key
    return BudgetState(common.eligible_ones(params, self.exclude))

  def update(self, state: BudgetState, params, grads, step) -> BudgetState:
    del grads
    counts = self.counts(params)
    mask = jax.lax.cond(
        step == self.start,
        lambda: grouped_top_k(jax.tree.map(jnp.abs, params), counts, self.exclude),
        lambda: state.mask)
    return BudgetState(mask)

  def mask(self, state: BudgetState):
    return state.mask


def budget_fitness(theta_pre, delta, config, batches, density: float,
                   exclude: tuple[str, ...] = ()):
  """Self-Pruner's fitness for use (a): rates → mean ProtoNet accuracy (%) on the fixed
  episode `batches` of θ_pre + m ⊙ δ, m the per-group top |δ| at those rates (δ: a densely
  meta-tuned delta, e.g. a PMF run's)."""
  from smat import fewshot

  @jax.jit  # θ_pre and δ are arguments: closed over, XLA would constant-fold the sort
  def accuracy(theta_pre, delta, counts, episodes):
    mask = grouped_top_k(jax.tree.map(jnp.abs, delta), counts, exclude)
    theta = jax.tree.map(lambda p, m, d: p + m * d, theta_pre, mask, delta)
    return fewshot.batch_accuracy(theta, episodes, config)

  def fitness(rates) -> float:
    counts = jnp.asarray(group_counts(delta, density, rates, exclude), jnp.int32)
    return 100.0 * float(np.mean(np.concatenate([
        np.asarray(accuracy(theta_pre, delta, counts, b)) for b in batches])))

  return fitness
