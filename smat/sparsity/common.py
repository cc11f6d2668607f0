"""What every sparsity strategy shares: the budget, the exact global top-k and the cubic schedule.

A strategy is a frozen dataclass (its hyper-parameters, the budget `density` among them) with
three pure functions over a tree shaped like δ:

  state = strategy.init(params, key)                  params: δ (or any tree shaped like it)
  state = strategy.update(state, params, grads, step) grads: ∂L/∂δ at `params`; step: 0-based
  mask  = strategy.mask(state)                        float tree like δ, values in [0, 1]

The mask multiplies δ: θ = θ_base + stop_gradient(mask) ⊙ δ, so an entry with mask 0 keeps its
base (pre-trained or task) value and gets no gradient. Masks of binary strategies hold exactly
`kept_count(params, density)` ones once their schedule has ended.
Leaves whose path starts with one of `exclude` (e.g. the frozen embeddings) are never selected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smat.meta import experts


def eligible(params, exclude: tuple[str, ...]) -> list[bool]:
  """Per leaf (in tree order): may the strategy select entries of it?"""
  return [not experts.path_name(path).startswith(exclude) if exclude else True
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def eligible_size(params, exclude: tuple[str, ...] = ()) -> int:
  return sum(int(np.prod(p.shape)) for p, ok in zip(jax.tree.leaves(params),
                                                     eligible(params, exclude)) if ok)


def kept_count(params, density: float, exclude: tuple[str, ...] = ()) -> int:
  """Entries a mask of `density` keeps: round(density · all entries), all of them eligible.

  The denominator counts every entry of δ, excluded leaves too, as SMAT's sparsity does.
  """
  if not 0.0 <= density <= 1.0:
    raise ValueError(f"density {density} is not in [0, 1]; it is 1 − τ")
  kept = int(round(density * experts.total_size(params)))
  room = eligible_size(params, exclude)
  if kept > room:
    raise ValueError(f"density {density} keeps {kept} entries but only {room} are eligible "
                     f"(the rest are excluded: {exclude}); lower the density")
  return kept


def top_k_mask(scores, kept, exclude: tuple[str, ...] = ()):
  """Float {0, 1} tree: exactly `kept` ones at the highest scores over all eligible leaves (one
  global threshold); ties go to the earlier entry in tree order. `kept` may be traced."""
  leaves = jax.tree.leaves(scores)
  ok = eligible(scores, exclude)
  flat = jnp.concatenate([jnp.ravel(s).astype(jnp.float32) if e
                          else jnp.full((s.size,), -jnp.inf) for s, e in zip(leaves, ok)])
  order = jnp.argsort(-flat, stable=True)
  keep = jnp.zeros(flat.shape, jnp.float32).at[order].set(
      (jnp.arange(flat.size) < kept).astype(jnp.float32))
  return unflatten_like(keep, scores)


def unflatten_like(vector: jax.Array, tree):
  """The inverse of concatenating the raveled leaves of `tree`."""
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    out.append(vector[offset:offset + leaf.size].reshape(leaf.shape))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


def cubic(step, start: int, end: int, initial: float, final: float):
  """Zhu & Gupta (2017): initial before `start`, final from `end`, and in between
  final + (initial − final) · (1 − (step − start) / (end − start))³."""
  progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - progress) ** 3


def scheduled_count(params, density: float, step, start: int, end: int,
                    exclude: tuple[str, ...] = ()):
  """Kept entries at `step` when the kept fraction falls cubically from 1 to `density`
  (all eligible entries before `start`, exactly `kept_count` from `end`)."""
  final, room = kept_count(params, density, exclude), eligible_size(params, exclude)
  return jnp.round(cubic(step, start, end, float(room), float(final))).astype(jnp.int32)


def eligible_ones(params, exclude: tuple[str, ...] = ()):
  """The dense mask: 1 on eligible leaves, 0 on excluded ones."""
  return jax.tree.unflatten(jax.tree.structure(params), [
      jnp.full(p.shape, float(e), jnp.float32)
      for p, e in zip(jax.tree.leaves(params), eligible(params, exclude))])

