"""Figures of a meta-trained run, and the numbers behind them (`smat plot`).

  mask_density.png     per expert: fraction of non-zero deterministic gates per block and
                       parameter type (query, key, value, proj, fc1, fc2, norm1, norm2)
  expert_choice.png    per evaluation domain: the router's mean α over test episodes
  specialisation.json  I(domain; expert) from those α and the experts' mask overlap
                       (`smat.specialisation`)

Densities are coverage-weighted like every sparsity figure (`smat.meta.experts`): a structured
gate counts for each backbone entry it scales.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from smat import specialisation
from smat.errors import require
from smat.meta import experts, gates, router, tasks
from smat.models import layout

PARAM_TYPES = layout.BLOCK_KINDS  # the rows of the mask-density figure, in its order


def density_by_layer(gate_logits, theta_pre, expected: bool = False) -> dict[str, np.ndarray]:
  """{parameter type: [M, L] fraction of the type's entries in block l that expert k keeps}.

  Kept = non-zero deterministic gate (what meta-test uses, and what the sparsity budget τ
  constrains), or with `expected` the probability that a training sample is non-zero. Types are the
  block modules of `PARAM_TYPES` (kernel and bias together); "embeddings" and "final norm"
  give [M, 1].
  """
  keep = ((lambda g: gates.prob_nonzero(g)) if expected
          else (lambda g: (gates.deterministic(g) != 0).astype(np.float32)))
  return kept_by_layer(jax.tree.map(lambda g: keep(g) if experts.has_gates(g) else g,
                                    gate_logits), theta_pre)


def kept_by_layer(kept_entries, theta_pre) -> dict[str, np.ndarray]:
  """`density_by_layer` of a tree of per-expert kept values [M, *G] in [0, 1] (a mask
  strategy's masks ≠ 0, or gate probabilities)."""
  kept, total = {}, {}
  flat_gates = jax.tree_util.tree_flatten_with_path(kept_entries)[0]
  for (path, z), p in zip(flat_gates, jax.tree.leaves(theta_pre)):
    name = layout.path_name(path)
    kind, per_layer = layout.kind(name), layout.layer_count(name, p.shape)
    size = np.prod(p.shape) / per_layer
    if experts.has_gates(z):
      coverage = np.prod(p.shape) / z[0].size
      nonzero = np.asarray(z).reshape(z.shape[0], per_layer, -1).sum(-1) * coverage
    else:
      nonzero = np.zeros((z.shape[0], per_layer))
    kept[kind] = kept.get(kind, 0.0) + nonzero
    total[kind] = total.get(kind, 0.0) + size
  return {kind: kept[kind] / total[kind] for kind in kept}


@functools.partial(jax.jit, static_argnames="hp")
def _alpha(router_params, router_state, theta_pre, episodes, temp, *, hp):
  params = router.spectral_normalize(router_params, router_state)
  return jax.vmap(lambda e: tasks.route(params, theta_pre, e, hp, temp)[1])(episodes)


def expert_choice(run, groups: dict[str, list], sampler, image_size: int, episodes: int = 100,
                  seed: int = 0, batch_size: int = 10) -> dict[str, np.ndarray]:
  """{domain: mean router α [M] over `episodes` test episodes} of a SMAT/SoftMerge run."""
  from smat.data import loader

  out = {}
  for name, group in groups.items():
    source = loader.EpisodeSource(tuple(group), "test", sampler, image_size, seed=seed)
    size = loader.even_batch_size(episodes, batch_size)
    alphas = [np.asarray(_alpha(run.params["router"], run.router_state, run.theta_pre, batch,
                                run.temperature, hp=run.hp))
              for batch in loader.batch_iterator(source, size, episodes // size)]
    out[name] = np.concatenate(alphas).mean(0)
  return out


def figure(width: float, height: float):
  """(pyplot, a new figure) drawn off-screen: every figure of smat and of its scripts."""
  matplotlib = require("matplotlib", "plots", "figures")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt, plt.figure(figsize=(width, height), dpi=120)


def plot_density(density: dict[str, np.ndarray], path: str, label: str = "mask density") -> None:
  """One heat map per expert: rows = parameter types, columns = blocks."""
  kinds = [k for k in PARAM_TYPES if k in density]
  grid = np.stack([density[k] for k in kinds], 1)  # [M, types, L]
  num_experts, _, depth = grid.shape
  top = max(float(grid.max()), 1e-6)
  plt, fig = figure(2.2 + 1.6 * num_experts * max(depth, 4) / 4, 3.2)
  axes = fig.subplots(1, num_experts, squeeze=False)[0]
  for k, ax in enumerate(axes):
    image = ax.imshow(grid[k], vmin=0, vmax=top, cmap="viridis", aspect="auto")
    ax.set_title(f"expert {k}")
    ax.set_xticks(range(depth))
    ax.set_xlabel("block")
    ax.set_yticks(range(len(kinds)), kinds if k == 0 else [""] * len(kinds))
    for (i, j), value in np.ndenumerate(grid[k]):
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
              color="white" if value < 0.5 * top else "black")
  fig.colorbar(image, ax=list(axes), label=label)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def plot_expert_choice(choice: dict[str, np.ndarray], path: str) -> None:
  """Heat map: rows = domains, columns = experts, value = mean α."""
  names = list(choice)
  grid = np.stack([choice[n] for n in names])
  plt, fig = figure(1.5 + 0.7 * grid.shape[1], 0.9 + 0.45 * len(names))
  ax = fig.subplots()
  image = ax.imshow(grid, vmin=0, vmax=max(float(grid.max()), 1e-6), cmap="magma", aspect="auto")
  ax.set_xticks(range(grid.shape[1]))
  ax.set_xlabel("expert")
  ax.set_yticks(range(len(names)), names)
  for (i, j), value in np.ndenumerate(grid):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
            color="white" if value < 0.6 * grid.max() else "black")
  fig.colorbar(image, ax=ax, label="mean α")
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def block_entries(theta_pre) -> dict[str, int]:
  """Backbone entries per block of each parameter type (kernel and bias together)."""
  sizes = {}
  for name, p in layout.named_leaves(theta_pre):
    if layout.is_block(name):
      sizes[layout.kind(name)] = sizes.get(layout.kind(name), 0) + int(np.prod(p.shape[1:]))
  return sizes


def density_summary(density: dict[str, np.ndarray], theta_pre) -> dict:
  """Mean density (over experts) per parameter type, per block over all its entries, and the
  full [M, L] grids."""
  sizes = block_entries(theta_pre)
  kinds = [k for k in PARAM_TYPES if k in density]
  per_block = (sum(density[k].mean(0) * sizes[k] for k in kinds)
               / sum(sizes[k] for k in kinds))
  return {"by_type": {k: float(density[k].mean()) for k in density},
          "by_block": [float(v) for v in per_block],
          "by_expert": {k: density[k].tolist() for k in density}}


def meta_test_density(run) -> dict[str, np.ndarray]:
  """`density_by_layer` of the masks a SMAT run uses at meta-test: its deterministic gates, or
  a mask strategy's masks."""
  if "masks" in run.params:
    return kept_by_layer(jax.tree.map(lambda m: (m != 0).astype(np.float32),
                                      run.params["masks"]), run.theta_pre)
  return density_by_layer(run.params["gates"], run.theta_pre)


def write_run_figures(run, out_dir: str, groups: dict[str, list], sampler, image_size: int,
                      episodes: int = 100, seed: int = 0) -> list[str]:
  """The figures of a SMAT/SoftMerge run (and their .json) into `out_dir`; the files written."""
  import json
  import os

  os.makedirs(out_dir, exist_ok=True)
  figures = []  # (name, density [M, L] per type, label)
  if "masks" in run.params:  # a mask strategy: its (fixed) masks are what meta-test uses
    figures.append(("mask_density", meta_test_density(run),
                    f"density of the {run.hp.experts.mask_strategy.__class__.__name__} masks"))
  elif run.hp.method == "smat":
    figures += [(name, density_by_layer(run.params["gates"], run.theta_pre, expected), label)
                for name, expected, label in (
                    ("mask_density", False, "density of the deterministic (meta-test) mask"),
                    ("mask_density_expected", True, "expected density of a training sample"))]
  written, summary = [], {}
  for name, density, label in figures:
    plot_density(density, os.path.join(out_dir, f"{name}.png"), label)
    summary[name] = density_summary(density, run.theta_pre)
    written.append(f"{name}.png")
  if figures:
    with open(os.path.join(out_dir, "mask_density.json"), "w") as f:
      json.dump(summary, f, indent=1)
    written.append("mask_density.json")
  choice = expert_choice(run, groups, sampler, image_size, episodes, seed)
  plot_expert_choice(choice, os.path.join(out_dir, "expert_choice.png"))
  with open(os.path.join(out_dir, "expert_choice.json"), "w") as f:
    json.dump({name: alpha.tolist() for name, alpha in choice.items()}, f, indent=1)
  masks = specialisation.deployed_masks(run)
  measured = {"routing_information": specialisation.routing_information(choice),
              "mask_overlap": (specialisation.mask_overlap(masks, run.theta_pre)
                               if masks is not None else None)}
  with open(os.path.join(out_dir, "specialisation.json"), "w") as f:
    json.dump(measured, f, indent=1)
  return written + ["expert_choice.png", "expert_choice.json", "specialisation.json"]
