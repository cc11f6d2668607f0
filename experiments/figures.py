"""Figures of the experiments: the sweep's ID-vs-OOD trade-off, the strategies' mask density
side by side, and the compression curve. A run's own figures are `smat.plots`'s."""

from __future__ import annotations

import numpy as np

from smat import plots
from smat.models import layout


def plot_tradeoff(points: list[dict], path: str) -> None:
  """ID vs OOD average accuracy: one marker per point {tau, experts, id, ood[, id_ci, ood_ci]}."""
  plt, fig = plots.figure(5.0, 4.0)
  ax = fig.subplots()
  for m in sorted({p["experts"] for p in points}):
    row = sorted((p for p in points if p["experts"] == m), key=lambda p: p["tau"])
    ax.errorbar([p["id"] for p in row], [p["ood"] for p in row],
                xerr=[p.get("id_ci", 0) for p in row], yerr=[p.get("ood_ci", 0) for p in row],
                marker="o", capsize=2, label=f"M = {m}")
    for p in row:
      ax.annotate(f"τ={p['tau']:g}", (p["id"], p["ood"]), fontsize=7,
                  textcoords="offset points", xytext=(3, 3))
  ax.set_xlabel("ID average accuracy (%)")
  ax.set_ylabel("OOD average accuracy (%)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def plot_density_comparison(panels: dict[str, dict[str, dict[str, float]]], path: str,
                            title: str = "mask density by parameter type") -> None:
  """Grouped bars, one panel per {panel title: {mask source: {type: density}}} (e.g. one per
  target sparsity): for each parameter type, one bar per source, a source keeping its colour
  in every panel."""
  sources = list(dict.fromkeys(name for panel in panels.values() for name in panel))
  kinds = [k for k in (*plots.PARAM_TYPES, layout.EMBEDDING_KIND, layout.FINAL_NORM_KIND)
           if any(k in d for panel in panels.values() for d in panel.values())]
  plt, fig = plots.figure(9.0, 3.0 * len(panels) + 0.6)
  axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True, sharey=True))
  width = 0.8 / max(len(sources), 1)
  for ax, (panel_title, by_type) in zip(axes, panels.items()):
    for i, name in enumerate(sources):
      if name in by_type:
        ax.bar(np.arange(len(kinds)) + (i - (len(sources) - 1) / 2) * width,
               [by_type[name].get(k, 0.0) for k in kinds], width, label=name, color=f"C{i}")
    ax.set_ylabel("fraction of entries kept")
    ax.set_title(panel_title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  axes[-1].set_xticks(np.arange(len(kinds)), kinds, rotation=30, ha="right")
  fig.suptitle(title)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)


def plot_compression(points: list[dict], path: str) -> None:
  """Structured pruning: ID and OOD accuracy against the parameters removed (left) and the
  measured speed-up (right), uniform and searched per-layer rates as separate lines. Each point
  has `rates_from`, `total_sparsity`, `id`, `ood` and `speedup`."""
  plt, fig = plots.figure(10.0, 3.6)
  acc_ax, speed_ax = fig.subplots(1, 2)
  for kind, marker in (("uniform", "o"), ("searched", "s")):
    chosen = sorted((p for p in points if p["rates_from"] in (kind, "unpruned")),
                    key=lambda p: p["total_sparsity"])
    if len(chosen) < 2:
      continue
    x = [p["total_sparsity"] for p in chosen]
    for split, style in (("id", "-"), ("ood", "--")):
      acc_ax.plot(x, [p[split] for p in chosen], style, marker=marker,
                  label=f"{split.upper()}, {kind} rates")
    speed_ax.plot(x, [p["speedup"] for p in chosen], marker=marker, label=f"{kind} rates")
  acc_ax.set_ylabel("zero-shot accuracy (%)")
  speed_ax.set_ylabel("measured forward speed-up (×)")
  speed_ax.axhline(1.0, color="grey", lw=0.8)
  for ax in (acc_ax, speed_ax):
    ax.set_xlabel("fraction of parameters removed")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle("structured pruning of heads and MLP channels (no retraining)")
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
