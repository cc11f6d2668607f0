"""The evaluator: few-shot accuracy of any model on identical episodes, zero-shot or fine-tuned.

One `Protocol` value says which episodes a number is over (sampler, episodes, seed, the reserved
lr-search episodes, image size and resizing); `evaluate` runs a model on it, for every method
(Pre, PMF, SoftMerge, SMAT) and adaptation mode, and `report` on several protocols at once (the
5w1s / 5w5s columns of a table). A domain's episodes are a pure function of (seed, split,
domain, index), so one protocol gives every model and mode the same episodes. Models with one
backbone for all tasks (Pre = θ_pre, PMF = θ_pre + δ) go through `fewshot` (feature tables
when cheaper; same numbers); expert methods build θ_task per episode (deterministic gates,
α = normalised sigmoid(ℓ / T)). `record` is the schema of a written result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from smat import fewshot, finetune, metatrain
from smat.data import loader
from smat.data.episodes import split_resize_ratio
from smat.data.samplers import FixedSampler
from smat.errors import SmatError

RESERVED_EPISODES = finetune.FinetuneConfig().search_episodes


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Which episodes a number is over.

  The first `reserved` episodes of each domain's stream are kept for the fine-tuning lr search
  and never reported, in every mode, so that zero-shot and fine-tuned numbers of one protocol
  share their episodes; `episodes` are reported after them. `resize_ratio`: as
  `loader.EpisodeSource`'s (None: 146/128 for test images).
  """

  sampler: object
  image_size: int
  episodes: int = 600
  seed: int = 0
  reserved: int = RESERVED_EPISODES
  resize_ratio: float | None = None
  split: str = "test"

  def stream(self, group) -> loader.EpisodeSource:
    """The whole episode stream of a domain group, the reserved episodes first."""
    return loader.EpisodeSource(tuple(group), self.split, self.sampler, self.image_size,
                                seed=self.seed, resize_ratio=self.resize_ratio)

  def describe(self) -> dict:
    """The protocol's fields as a result records them."""
    sampler = self.sampler
    fields = (dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else {})
    return {"sampler": type(sampler).__name__, **fields, "episodes": self.episodes,
            "seed": self.seed, "reserved_episodes": self.reserved,
            "image_size": self.image_size, "split": self.split,
            "test_resize_ratio": split_resize_ratio(self.split, self.resize_ratio)}


@dataclasses.dataclass(frozen=True)
class Subject:
  """What is evaluated, with what its origin implies: the model (a `Run` or a frozen
  (θ, ViTConfig)), its method name, its image size and test-time resizing, the test SPECs its
  config names (data.test) and the SPECs it meta-trained on (data.train)."""

  model: object
  method: str
  image_size: int
  resize_ratio: float | None = None
  test_specs: tuple[str, ...] = ()
  trained_specs: tuple[str, ...] = ()
  config: object = None  # a run's config (ConfigDict), None for a frozen backbone

  @classmethod
  def of_run(cls, workdir: str) -> "Subject":
    """A `smat meta-train` workdir's best checkpoint."""
    import os

    from smat import config as config_lib

    run = metatrain.load_run(workdir)
    config = config_lib.from_json(os.path.join(workdir, "config.json"))
    specs = lambda field: tuple(s for s in config.data.get(field, "").split(",") if s)
    return cls(run, run.hp.method, config.data.image_size, config.data.get("test_resize_ratio"),
               specs("test"), specs("train"), config)

  @classmethod
  def of_backbone(cls, path: str, fmt: str | None = None, arch: str | None = None) -> "Subject":
    """θ_pre as it is (`--method pre`): a backbone directory or a .safetensors file."""
    from smat.models import checkpoint

    model = checkpoint.load(path, fmt, arch)
    return cls(model, "pre", model[1].image_size)


def fixed_protocols(image_size: int, ways: int = 5, shots=(1, 5), queries: int = 15,
                    **fields) -> dict[str, Protocol]:
  """{"5w1s": Protocol, "5w5s": Protocol, ...}: fixed-shape episodes, one protocol per shot
  count, the other fields (episodes, seed, reserved, resize_ratio) shared."""
  return {f"{ways}w{k}s": Protocol(FixedSampler(ways, k, queries), image_size, **fields)
          for k in shots}


def shared_backbone(model):
  """(θ, ViTConfig) when every task uses one backbone (Pre given as such, PMF's θ_pre + δ);
  None when the model builds θ_task per task (SoftMerge, SMAT)."""
  if not isinstance(model, metatrain.Run):
    return model
  return (model.dense_params(), model.hp.vit) if model.hp.method == "pmf" else None


def _frozen_zero_shot(backbone, reported: loader.EpisodeSource, episodes: int, features: dict,
                      progress):
  """Zero-shot ProtoNet of a frozen backbone; each test image embedded once (`features`, shared
  by the protocols of a report) when that is cheaper than embedding each episode."""
  params, config = backbone
  key = (tuple(id(d) for d in reported.domains)
         + (reported.split, reported.image_size, reported.resize_ratio))
  if key not in features and fewshot.worth_caching(reported, episodes):
    features[key] = [fewshot.embed_split(params, config, d, reported.split, reported.image_size,
                                         resize_ratio=reported.resize_ratio)
                     for d in reported.domains]
  if key in features:
    return fewshot.cached_zero_shot(params, config, reported, episodes, tables=features[key])
  return fewshot.zero_shot(params, config, reported, episodes, progress=progress)


def _per_task_zero_shot(run, reported: loader.EpisodeSource, episodes: int, batch_size: int,
                        progress):
  """Zero-shot accuracy (and mean α) of a model that builds θ_task per episode."""
  size = loader.even_batch_size(episodes, batch_size)
  return metatrain.evaluate(run, loader.batch_iterator(reported, size, episodes // size),
                            progress=progress)


def evaluate(model, groups: dict[str, list], protocol: Protocol, adapt: str = "zero-shot",
             ft: finetune.FinetuneConfig = finetune.FinetuneConfig(), lr: float | None = None,
             batch_size: int | None = None, progress: bool = True,
             features: dict | None = None) -> dict:
  """{domain: {accuracy, ci95, episodes, episodes_per_s, per_episode, ways/shots summary
  [, alpha_mean][, lr, lr_search]}} of `model` on `protocol`'s episodes of each domain group.

  `model`: a `metatrain.Run`, or (θ, ViTConfig) for a frozen backbone. `adapt`: "zero-shot" or
  one of `finetune.ADAPTERS`, whose lr search uses the protocol's reserved episodes (`lr`
  given: no search). `features`: a dict that evaluations of the same domains share, so a frozen
  backbone embeds each test image once for all of them.
  """
  if adapt != "zero-shot" and ft.search_episodes != protocol.reserved:
    raise SmatError(f"the lr search uses {ft.search_episodes} episodes but the protocol "
                    f"reserves {protocol.reserved}: give Protocol(reserved=ft.search_episodes)")
  features = {} if features is None else features
  backbone = shared_backbone(model)
  results = {}
  for name, group in groups.items():
    label = name if progress else None
    stream = protocol.stream(group)
    reported = dataclasses.replace(stream, first=protocol.reserved)
    if adapt != "zero-shot":
      result = finetune.evaluate_source(model, finetune.ADAPTERS[adapt], stream,
                                        protocol.episodes, protocol.seed, ft, lr,
                                        batch_size or 1, label)
    elif backbone is None:
      result = _per_task_zero_shot(model, reported, protocol.episodes, batch_size or 8, label)
    else:
      result = _frozen_zero_shot(backbone, reported, protocol.episodes, features, label)
    summary = loader.describe_plans(reported, protocol.episodes)
    results[name] = {**result, **{k: v for k, v in summary.items() if k != "episodes"}}
  return results


def report(model, groups: dict[str, list], protocols: dict[str, Protocol],
           batch_size: int | None = None, progress: bool = True) -> dict:
  """{domain: {protocol label: result}}: zero-shot `evaluate` on each of `protocols` (e.g.
  `fixed_protocols`), a frozen backbone's features shared by all of them."""
  from tqdm.auto import tqdm

  features, out = {}, {name: {} for name in groups}
  for label, protocol in tqdm(protocols.items(), desc="zero-shot", unit="protocol",
                              disable=not progress):
    results = evaluate(model, groups, protocol, batch_size=batch_size, progress=progress,
                       features=features)
    for name, result in results.items():
      out[name][label] = result
  return out


def report_table(report: dict) -> str:
  """Markdown: rows = domains, columns = protocol labels, cells = accuracy ± CI."""
  kinds = list(next(iter(report.values())))
  lines = ["| domain | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
  for name, row in report.items():
    cells = [f"{row[k]['accuracy']:.2f} ± {row[k]['ci95']:.2f}" for k in kinds]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def averages(report: dict, id_domains, ood_domains) -> dict:
  """{"id": {kind: mean accuracy}, "ood": {...}} over the listed domains of a report."""
  kinds = list(next(iter(report.values())))
  mean = lambda names: {k: float(np.mean([report[n][k]["accuracy"] for n in names]))
                        for k in kinds}
  return {"id": mean(id_domains), "ood": mean(ood_domains)}


# Each method's column in a comparison table ("pre": θ_pre itself).
METHOD_LABELS = {"pre": "Pre", "pmf": "PMF", "softmerge": "SoftMerge", "smat": "SMAT"}


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


def record(results: dict, protocol: Protocol, method: str, id_domains, adapt: str = "zero-shot",
           ft: finetune.FinetuneConfig | None = None, **context) -> dict:
  """A written result: the protocol, the method and adaptation, per-domain results, ID/OOD
  averages, the software it ran on and the markdown table; `context` adds what the caller
  knows of the model (workdir, backbone, config)."""
  id_domains = list(id_domains)
  ood_domains = [s for s in results if s not in id_domains]
  return {"method": method, "adapt": adapt,
          "finetune": None if adapt == "zero-shot" else dataclasses.asdict(ft),
          **protocol.describe(), **context,
          "domains": results, "id_domains": id_domains, "ood_domains": ood_domains,
          "averages": summarize(results, id_domains, ood_domains),
          "software": software_versions(),
          "table": results_table(results, id_domains, method)}


def check_results(results: dict) -> None:
  """A non-finite accuracy is an error naming the domain, never a reported result."""
  for name, r in results.items():
    values = [r["accuracy"], r["ci95"], *r.get("per_episode", ())]
    bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
    if bad:
      raise SmatError(f"{name}: non-finite accuracy (NaN/Inf features or logits) in "
                      f"{len(bad)} episode(s); check the weights of the model (smat embed shows "
                      f"its features) — nothing was written")
