"""Zero-shot few-shot comparison of methods on identical episodes (Pre, PMF, SoftMerge, SMAT).

Every method sees the same episodes: a domain's episodes are a pure function of (seed, split,
domain, index). Methods with one backbone for all tasks (Pre = θ_pre, PMF = θ_pre + δ) go
through `fewshot.protonet_report` (feature tables when cheaper; same numbers); expert methods
build θ_task per episode (deterministic gates, α = normalised sigmoid(ℓ / T)).
"""

from __future__ import annotations

import numpy as np

from smat import fewshot, metatrain
from smat.data import loader
from smat.data.samplers import FixedSampler


def zero_shot_report(model, groups: dict[str, list], image_size: int, shots=(1, 5),
                     ways: int = 5, queries: int = 15, episodes: int = 600, seed: int = 0,
                     batch_size: int = 8, progress: bool = True) -> dict:
  """{domain: {"5w1s": {accuracy, ci95, episodes, episodes_per_s[, alpha_mean]}, ...}}.

  `model` is a `metatrain.Run`, or (θ, ViTConfig) for a frozen backbone.
  """
  if not isinstance(model, metatrain.Run) or model.hp.method == "pmf":
    params, config = ((model.dense_params(), model.hp.vit) if isinstance(model, metatrain.Run)
                      else model)
    return fewshot.protonet_report(params, config, groups, image_size, shots, ways, queries,
                                   episodes, seed, progress)
  report = {}
  for name, group in groups.items():
    report[name] = {}
    for k in shots:
      source = loader.EpisodeSource(tuple(group), "test", FixedSampler(ways, k, queries),
                                    image_size, seed=seed)
      size = max(b for b in range(1, batch_size + 1) if episodes % b == 0)
      batches = loader.batch_iterator(source, size, episodes // size)
      report[name][f"{ways}w{k}s"] = metatrain.evaluate(
          model, batches, progress=f"{model.hp.method} {name} {ways}w{k}s" if progress else None)
  return report


def averages(report: dict, id_domains, ood_domains) -> dict:
  """{"id": {kind: mean accuracy}, "ood": {...}} over the listed domains of a report."""
  kinds = list(next(iter(report.values())))
  mean = lambda names: {k: float(np.mean([report[n][k]["accuracy"] for n in names]))
                        for k in kinds}
  return {"id": mean(id_domains), "ood": mean(ood_domains)}


def comparison_table(reports: dict[str, dict], id_domains, ood_domains) -> str:
  """Markdown: rows = (domain, episode kind) and ID/OOD averages, columns = methods."""
  methods = list(reports)
  first = reports[methods[0]]
  kinds = list(next(iter(first.values())))
  lines = ["| domain | episodes | " + " | ".join(methods) + " |",
           "|---|---|" + "---|" * len(methods)]
  for name in first:
    tag = "ID" if name in id_domains else "OOD"
    for k in kinds:
      cells = [f"{reports[m][name][k]['accuracy']:.2f} ± {reports[m][name][k]['ci95']:.2f}"
               for m in methods]
      lines.append(f"| {name} ({tag}) | {k} | " + " | ".join(cells) + " |")
  avg = {m: averages(reports[m], id_domains, ood_domains) for m in methods}
  for split in ("id", "ood"):
    for k in kinds:
      lines.append(f"| **{split.upper()} average** | {k} | "
                   + " | ".join(f"{avg[m][split][k]:.2f}" for m in methods) + " |")
  return "\n".join(lines)
