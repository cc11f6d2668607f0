"""Sparse interpolated experts: θ_task = θ_pre + m_task ⊙ δ with m_task = Σ_k α_k z_k.

Trees (shapes for a backbone leaf p of shape P, M experts):
  delta  δ      [P]            one shared dense delta, zero-initialised
  gates  log_α  [M, *G]        G = P (unstructured), or broadcastable to P (structured)
  masks  z      [M, *G]        from `gates.sample` / `gates.deterministic`
  merged m      [*G]           Σ_k α_k z_k ∈ [0, 1]
Structured gates share one gate per input column of each dense kernel ([L, in, out] → [L, in, 1])
and one per output channel of the patch convolution; every other leaf keeps per-element gates.
With `freeze_embeddings` the patch/position embeddings and the CLS token get no gates: their
mask is 0 (δ never reaches θ) and they count as sparse in every sparsity figure.
SoftMerge replaces the gates by M dense deltas: θ_task = θ_pre + Σ_k α_k δ_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from smat.meta import gates as hc
from smat.models import layout
# The backbone's leaf names, read here by the mask strategies and the training loop.
from smat.models.layout import EMBEDDINGS, is_embedding, path_name


def gate_shape(name: str, shape: tuple[int, ...], structured: bool,
               freeze_embeddings: bool) -> tuple[int, ...] | None:
  """Shape of one expert's gates for the backbone leaf `name` (None: no gates, mask 0)."""
  if freeze_embeddings and is_embedding(name):
    return None
  if structured and layout.is_kernel(name):
    if layout.is_block(name):  # [L, in, out]: one gate per input column
      return shape[:-1] + (1,)
    if len(shape) == 4:  # patch convolution [p, p, 3, D]: one gate per output channel
      return (1, 1, 1, shape[-1])
  return tuple(shape)


def gate_shapes(params, structured: bool = False, freeze_embeddings: bool = False):
  """Tree (like `params`) of per-expert gate shapes, None where a leaf has no gates."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: gate_shape(path_name(path), tuple(p.shape), structured, freeze_embeddings),
      params)


def init_delta(params):
  """δ = 0 with the tree and dtypes of θ_pre (float32)."""
  return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def init_gates(key: jax.Array, params, num_experts: int, structured: bool = False,
               freeze_embeddings: bool = False, std: float = 0.5):
  """log_α ~ N(0, std²) clamped, [M, *G] per leaf; leaves without gates hold a [M, 0] array.

  (An empty array rather than None keeps the gate tree structurally equal to δ's.)
  """
  shapes = jax.tree.leaves(gate_shapes(params, structured, freeze_embeddings),
                           is_leaf=lambda x: x is None or isinstance(x, tuple))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = [hc.clamp(std * jax.random.normal(k, (num_experts,) + s)) if s is not None
         else jnp.zeros((num_experts, 0)) for k, s in zip(keys, shapes)]
  return jax.tree.unflatten(treedef, out)


def has_gates(log_alpha: jax.Array) -> bool:
  return log_alpha.size > 0


def sample_masks(key: jax.Array, gate_logits, noise_half_width: float = hc.FULL_NOISE):
  """Training masks z [M, *G] per leaf (independent noise per leaf and element). The step uses
  `sample_merged`, which gives the merged values without keeping z."""
  leaves, treedef = jax.tree.flatten(gate_logits)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [hc.sample(k, g, noise_half_width) if has_gates(g) else g
                                      for k, g in zip(keys, leaves)])


def sample_merged(key: jax.Array, gate_logits, alpha: jax.Array, params,
                  noise_half_width: float = hc.FULL_NOISE):
  """(m = Σ_k α_k z_k per leaf, each expert's sparsity [M]) of training masks: the values of
  `merge(alpha, sample_masks(key, ...))` and `sparsity` on them, without materialising z."""
  leaves, treedef = jax.tree.flatten(gate_logits)
  keys = jax.random.split(key, len(leaves))
  pairs = [hc.sample_and_merge(k, g, alpha, noise_half_width) if has_gates(g) else (g, None)
           for k, g in zip(keys, leaves)]
  nonzero = _coverage_mean(leaves, params, [count for _, count in pairs])
  return jax.tree.unflatten(treedef, [m for m, _ in pairs]), jnp.clip(1.0 - nonzero, 0.0, 1.0)


def eval_masks(gate_logits):
  """Deterministic masks z [M, *G] per leaf."""
  return jax.tree.map(lambda g: hc.deterministic(g) if has_gates(g) else g, gate_logits)


def merge(alpha: jax.Array, masks):
  """m = Σ_k α_k z_k per leaf ([*G]; leaves without gates stay empty)."""
  return jax.tree.map(lambda z: hc.weighted_sum(alpha, z) if has_gates(z) else z, masks)


def interpolate(theta_pre, delta, merged):
  """θ = θ_pre + m ⊙ δ (m broadcasts over structured axes; no gates → θ_pre)."""
  return jax.tree.map(lambda p, d, m: p + m * d if has_gates(m) else p, theta_pre, delta, merged)


def selected(merged, params):
  """Boolean tree shaped like `params`: the entries a task's merged mask m leaves non-zero
  (what sparse fine-tuning may update; leaves without gates select nothing)."""
  return jax.tree.map(lambda m, p: jnp.broadcast_to(m != 0, p.shape) if has_gates(m)
                      else jnp.zeros(p.shape, bool), merged, params)


def soft_merge(theta_pre, deltas, alpha: jax.Array):
  """SoftMerge: θ = θ_pre + Σ_k α_k δ_k with δ_k [M, *P] per leaf."""
  return jax.tree.map(lambda p, d: p + jnp.tensordot(alpha, d, axes=1), theta_pre, deltas)


def coverage(gate: jax.Array, param) -> float:
  """Backbone elements one expert's gate leaf stands for (structured gates cover several)."""
  return float(np.prod(param.shape)) / max(gate[0].size, 1) if has_gates(gate) else 0.0


def total_size(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _coverage_mean(gate_leaves, params, sums) -> jax.Array:
  """[M]: Σ over gated leaves of coverage × that leaf's per-expert sum [M], over all backbone
  elements."""
  total = jnp.zeros(gate_leaves[0].shape[:1])
  for g, p, s in zip(gate_leaves, jax.tree.leaves(params), sums):
    if has_gates(g):
      total = total + coverage(g, p) * s
  return total / total_size(params)


def _per_expert_mean(tree, params, per_gate) -> jax.Array:
  """[M]: Σ over gated leaves of coverage × Σ per_gate(gate), over all backbone elements."""
  leaves = jax.tree.leaves(tree)
  return _coverage_mean(leaves, params, [per_gate(g).reshape(g.shape[0], -1).sum(-1)
                                         if has_gates(g) else None for g in leaves])


def expected_l0(gate_logits, params) -> jax.Array:
  """[M]: expected fraction of non-zero gates of each expert over all backbone elements."""
  return _per_expert_mean(gate_logits, params, hc.prob_nonzero)


def sparsity(masks, params) -> jax.Array:
  """[M]: fraction of each expert's backbone elements whose gate is exactly 0 (clipped to
  [0, 1]: the float32 sum of the non-zero counts can exceed the total by an ulp)."""
  return jnp.clip(1.0 - _per_expert_mean(masks, params, lambda z: z != 0), 0.0, 1.0)


def deployed_sparsity(gate_logits, params) -> jax.Array:
  """[M]: `sparsity` of the deterministic masks meta-test uses (a gate is 0 there iff
  log_α ≤ logit(1/12) ≈ −2.40): the figure the budget controls and every table reports."""
  return sparsity(eval_masks(gate_logits), params)


def merged_density(merged, params) -> jax.Array:
  """Fraction of backbone elements the task's merged mask m leaves non-zero."""
  nonzero = 0.0
  for m, p in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    if has_gates(m):
      nonzero = nonzero + float(np.prod(p.shape)) / max(m.size, 1) * (m != 0).sum()
  return nonzero / total_size(params)
