"""Have the experts specialised? Two numbers read beside the expert-choice map.

  routing_information  the mutual information between a task's domain and the expert it is
                       routed to, from the router's mean α per domain
  mask_overlap         how much the experts' deployed masks share, against independent masks
                       of the same densities

Both are 0-informative by construction when nothing specialised (one routing for every domain,
masks as alike as chance makes them), so a figure can be read without knowing the run.
"""

from __future__ import annotations

import jax
import numpy as np

from smat.meta import experts


def _entropy(p: np.ndarray) -> float:
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def routing_information(choice: dict[str, np.ndarray]) -> dict:
  """I(domain; expert) in nats, with domains equally likely and p(expert | domain) the
  domain's mean α (`plots.expert_choice`): H(mean routing) − mean H(routing per domain). It is
  0 when every domain is routed alike and log(min(D, M)) at most (each domain its own expert);
  `normalised` divides by that bound."""
  routing = np.stack([np.asarray(a, np.float64) / np.sum(a) for a in choice.values()])
  mutual = _entropy(routing.mean(0)) - float(np.mean([_entropy(r) for r in routing]))
  bound = float(np.log(min(routing.shape)))
  return {"nats": max(mutual, 0.0), "bound_nats": bound,
          "normalised": max(mutual, 0.0) / bound if bound > 0 else 0.0}


def deployed_masks(run):
  """The masks [M, *G] per leaf a SMAT run uses at meta-test: its deterministic gates, or a
  mask strategy's masks; None for a run without masks."""
  if "masks" in run.params:
    return run.params["masks"]
  if "gates" in run.params:
    return experts.eval_masks(run.params["gates"])
  return None


def mask_overlap(masks, theta_pre) -> dict:
  """Jaccard overlap |z_i ∧ z_j| / |z_i ∨ z_j| of the experts' masks (`deployed_masks`), over backbone
  elements (a gate counted once per element it covers), as an [M, M] matrix, with `chance`:
  the same for independent masks of those densities, ρ_i ρ_j / (ρ_i + ρ_j − ρ_i ρ_j)."""
  size = experts.total_size(theta_pre)
  both, kept = 0.0, 0.0
  for z, p in zip(jax.tree.leaves(masks), jax.tree.leaves(theta_pre)):
    if not experts.has_gates(z):
      continue
    on = (np.asarray(z) != 0).reshape(z.shape[0], -1).astype(np.float64)  # [M, gates]
    cover = experts.coverage(z, p)  # backbone elements per gate
    both = both + cover * on @ on.T
    kept = kept + cover * on.sum(1)
  density = kept / size
  union = kept[:, None] + kept[None, :] - both
  jaccard = np.where(union > 0, both / np.maximum(union, 1e-30), 0.0)
  rho = density[:, None] * density[None, :]
  chance = np.where(rho > 0, rho / np.maximum(density[:, None] + density[None, :] - rho, 1e-30),
                    0.0)
  off = ~np.eye(len(density), dtype=bool)
  return {"density": density.tolist(), "jaccard": jaccard.tolist(), "chance": chance.tolist(),
          "mean_jaccard": float(jaccard[off].mean()) if off.any() else None,
          "mean_chance": float(chance[off].mean()) if off.any() else None}
