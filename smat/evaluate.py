"""Few-shot evaluation of methods on identical episodes (Pre, PMF, SoftMerge, SMAT).

Every method sees the same episodes: a domain's episodes are a pure function of (seed, split,
domain, index). Methods with one backbone for all tasks (Pre = θ_pre, PMF = θ_pre + δ) go
through `fewshot.protonet_report` (feature tables when cheaper; same numbers); expert methods
build θ_task per episode (deterministic gates, α = normalised sigmoid(ℓ / T)).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smat import fewshot, finetune, metatrain
from smat.data import loader
from smat.data.samplers import FixedSampler
from smat.errors import SmatError


def _per_task(model) -> bool:
  """Whether `model` builds θ_task per episode (expert methods) rather than one backbone."""
  return isinstance(model, metatrain.Run) and model.hp.method != "pmf"


def _backbone(model):
  """(θ, ViTConfig) of a one-backbone model: Pre given as such, or PMF's θ_pre + δ."""
  return (model.dense_params(), model.hp.vit) if isinstance(model, metatrain.Run) else model


def _per_task_accuracy(run, source, episodes: int, batch_size: int, progress: str | None):
  size = loader.even_batch_size(episodes, batch_size)
  return metatrain.evaluate(run, loader.batch_iterator(source, size, episodes // size),
                            progress=progress)


def zero_shot_report(model, groups: dict[str, list], image_size: int, shots=(1, 5),
                     ways: int = 5, queries: int = 15, episodes: int = 600, seed: int = 0,
                     batch_size: int = 8, progress: bool = True,
                     resize_ratio: float | None = None) -> dict:
  """{domain: {"5w1s": {accuracy, ci95, episodes, episodes_per_s[, alpha_mean]}, ...}}.

  `model` is a `metatrain.Run`, or (θ, ViTConfig) for a frozen backbone; test images are
  resized and centre-cropped by `resize_ratio` (default 146/128, `episodes.resize`).
  """
  if not _per_task(model):
    return fewshot.protonet_report(*_backbone(model), groups, image_size, shots, ways, queries,
                                   episodes, seed, progress, resize_ratio)
  report = {}
  for name, group in groups.items():
    report[name] = {}
    for k in shots:
      source = loader.EpisodeSource(tuple(group), "test", FixedSampler(ways, k, queries),
                                    image_size, seed=seed, resize_ratio=resize_ratio)
      label = f"{model.hp.method} {name} {ways}w{k}s" if progress else None
      report[name][f"{ways}w{k}s"] = _per_task_accuracy(model, source, episodes, batch_size,
                                                        label)
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


def evaluate_domains(model, groups: dict[str, list], sampler, image_size: int,
                     episodes: int = 600, seed: int = 0, adapt: str = "zero-shot",
                     ft: finetune.FinetuneConfig = finetune.FinetuneConfig(),
                     lr: float | None = None, batch_size: int | None = None,
                     progress: bool = True, resize_ratio: float | None = None) -> dict:
  """{domain: {accuracy, ci95, episodes, episodes_per_s, ways/shots summary[, lr, lr_search]}}.

  Same seed → same episodes for every model and every `adapt` mode: the first
  `ft.search_episodes` episodes of each domain are reserved for the fine-tuning lr search and
  never reported, whatever the mode. `model` is a `metatrain.Run` or (θ, ViTConfig); test
  images are resized and centre-cropped by `resize_ratio` (default 146/128, `episodes.resize`).
  """
  results = {}
  for name, group in groups.items():
    source = loader.EpisodeSource(tuple(group), "test", sampler, image_size, seed=seed,
                                  resize_ratio=resize_ratio)
    reported = dataclasses.replace(source, first=ft.search_episodes)
    label = name if progress else None
    if adapt != "zero-shot":
      result = finetune.evaluate_source(model, finetune.ADAPTERS[adapt], source, episodes, seed,
                                        ft, lr, batch_size or 1, label)
    elif _per_task(model):
      result = _per_task_accuracy(model, reported, episodes, batch_size or 8, label)
    else:
      params, config = _backbone(model)
      result = (fewshot.cached_zero_shot(params, config, reported, episodes)
                if fewshot.worth_caching(reported, episodes)
                else fewshot.zero_shot(params, config, reported, episodes, progress=label))
    summary = loader.describe_plans(reported, episodes)
    results[name] = {**result, **{k: v for k, v in summary.items() if k != "episodes"}}
  return results


# Libraries whose version can change a number in a result: the arithmetic (jax, jaxlib, numpy),
# the training code (flax, optax), the data (grain, TFDS, Pillow and fontTools render glyphs).
RESULT_LIBRARIES = ("smat", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                    "grain", "tensorflow-datasets", "pillow", "fonttools", "ml_collections")


def software_versions() -> dict:
  """Versions, device and thread settings a result depends on: two results agree to the bit
  only when all of these do (README, "Two commands")."""
  import importlib.metadata as metadata
  import platform

  import jax
  from PIL import features

  from smat import threads

  versions = {"python": platform.python_version()}
  for name in RESULT_LIBRARIES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  versions["freetype"] = features.version("freetype2")
  device = jax.devices()[0]
  versions["device"] = {"platform": device.platform, "kind": device.device_kind,
                        "count": jax.device_count(), "machine": platform.machine(),
                        "cpu": _cpu_model()}
  versions["threads"] = threads.describe()
  return versions


def _cpu_model() -> str | None:
  """The CPU's model name (Linux): its instruction set changes XLA's vector code."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  None)
  except OSError:
    return None


def summarize(results: dict, id_domains, ood_domains) -> dict:
  """ID and OOD averages (mean accuracy over the domains of each kind present)."""
  pick = lambda names: [results[n]["accuracy"] for n in names if n in results]
  return {kind: (float(np.mean(values)) if values else None)
          for kind, values in (("id", pick(id_domains)), ("ood", pick(ood_domains)))}


def results_table(results: dict, id_domains, method: str) -> str:
  """Markdown: one row per domain (accuracy ± CI, episodes, mean ways/shots[, chosen lr])."""
  tuned = any("lr" in r for r in results.values())
  lines = [f"| domain | {method} | episodes | ways (mean) | shots (mean) |"
           + (" lr |" if tuned else ""), "|---|---|---|---|---|" + ("---|" if tuned else "")]
  for name, r in results.items():
    tag = "ID" if name in id_domains else "OOD"
    lines.append(f"| {name} ({tag}) | {r['accuracy']:.2f} ± {r['ci95']:.2f} | {r['episodes']} | "
                 f"{r['ways_mean']:.1f} | {r['shots_mean']:.1f} |"
                 + (f" {r['lr']:g} |" if tuned else ""))
  return "\n".join(lines)


def check_results(results: dict) -> None:
  """A non-finite accuracy is an error naming the domain, never a reported result."""
  for name, r in results.items():
    values = [r["accuracy"], r["ci95"], *r.get("per_episode", ())]
    bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
    if bad:
      raise SmatError(f"{name}: non-finite accuracy (NaN/Inf features or logits) in "
                      f"{len(bad)} episode(s); check the weights of the model (smat embed shows "
                      f"its features) — nothing was written")
