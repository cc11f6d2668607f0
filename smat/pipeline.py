"""The main job on the offline benchmark (`smat reproduce`).

Stages: build the glyphs benchmark → describe every evaluation domain → draw example episodes
→ measure the episode loader → pre-train the small backbone θ_pre → meta-train PMF and SMAT on
top of it → zero-shot comparison of Pre, PMF and SMAT on identical episodes, in distribution
(glyphs:id test classes) and out of distribution (held-out scripts, Fashion-MNIST) → figures of
the SMAT run (`figures/`: mask density per block and parameter type, expert choice per domain).
Every stage writes into the workdir, one directory per method (`pretrain/`, `pmf/`, `smat/`);
`results.json` / `results.md` hold the comparison and `summary.json` every figure.
Re-running resumes: finished stages are cached, training resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from smat import config as config_lib
from smat import evaluate, metatrain, plots, pretrain
from smat.data import loader
from smat.data.samplers import FixedSampler
from smat.data.show import episode_grid
from smat.data.sources import glyphs
from smat.data.spec import default_data_dir, load_domain
from smat.errors import SmatError

EVAL_SPECS = ("glyphs:id", "glyphs:ood", "fashion_mnist")
ID_SPECS, OOD_SPECS = ("glyphs:id",), ("glyphs:ood", "fashion_mnist")
META_CONFIGS = {"pmf": "pmf_glyphs", "smat": "smat_glyphs"}
DEFAULT_WORKDIR = "runs/demo"  # the glyph configs' backbone.path is its pretrain/backbone
# Fields the job sets itself (overriding them would split the stages' inputs), and what to use.
JOB_FIELDS = {"data_dir": "--data-dir",
              "backbone.path": "--workdir (the backbone is <workdir>/pretrain/backbone)",
              "eval.domains": f"nothing: the job compares on {', '.join(EVAL_SPECS)}"}


def evaluated_models_note(evaluated: dict, tau: float) -> str:
  """One line per meta-trained column: the checkpoint it evaluates (step, epoch, validation
  accuracy) and, for SMAT, the deployed sparsity of each expert beside τ."""
  lines = []
  for name, d in evaluated.items():
    epochs = f"{d['epoch']} epoch" + ("" if d["epoch"] == 1 else "s")
    line = (f"{name}: `best/` checkpoint, step {d['step']} (after {epochs}), validation "
            f"{d['val_accuracy']:.2f}")
    if d["sparsity"]:
      deployed = " / ".join(f"{x:.3f}" for x in d["sparsity"]["deployed"])
      line += f", deployed sparsity per expert {deployed} (τ = {tau:g})"
    lines.append(line + ".")
  return "  \n".join(lines)


def stage_configs(paths: dict[str, str], overrides: Sequence[str] = ()) -> dict:
  """Each stage's config (`paths`: stage → config spec) with the user's overrides: an override
  goes to every stage whose config has its field; one that no stage has, or that the job sets
  itself, is an error before any stage runs."""
  loaded = {stage: config_lib.load(path) for stage, path in paths.items()}
  mine = {stage: [] for stage in paths}
  for override in overrides:
    key = config_lib.override_key(override)
    if key in JOB_FIELDS:
      raise SmatError(f"--config.{key}: `smat reproduce` sets this field itself; use "
                      f"{JOB_FIELDS[key]}")
    stages = [stage for stage, c in loaded.items() if config_lib.has_field(c, key)]
    if not stages:
      raise SmatError(f"--config.{key}: no config of `smat reproduce` has this field "
                      f"({', '.join(paths.values())}); check its spelling")
    for stage in stages:
      mine[stage].append(override)
  return {stage: config_lib.load(path, mine[stage]) for stage, path in paths.items()}


@dataclasses.dataclass
class Job:
  """What the stages share: the workdir, the stage configs, what earlier stages produced and
  `summary`, written to summary.json at the end."""

  out: Path
  configs: dict
  data_dir: str
  comparison_episodes: int
  summary: dict = dataclasses.field(default_factory=dict)
  domains: dict = dataclasses.field(default_factory=dict)
  runs: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    """The episode-stream config (seed, image size, sampler)."""
    return self.configs["episodes"]


def build_data(job: Job) -> None:
  job.summary.update(data_dir=job.data_dir, glyphs_build=str(glyphs.build(job.data_dir)),
                     domains={})


def describe_domains(job: Job) -> None:
  """Each evaluation domain's size per split and an example episode picture."""
  job.domains = {spec: load_domain(spec, job.data_dir) for spec in EVAL_SPECS}
  for spec, domain in job.domains.items():
    described = domain.describe()
    job.summary["domains"][spec] = {k: described[k]
                                    for k in ("num_classes", "num_images", "splits")}
    splits = ", ".join(f"{s} {v['num_classes']}" for s, v in described["splits"].items()
                       if v["num_classes"])
    print(f"  {spec:14s} {described['num_classes']:5d} classes ({splits}), "
          f"{described['num_images']} images")
    split = "train" if domain.classes("train") else "test"
    source = loader.EpisodeSource((domain,), split, loader.make_sampler(job.config.data), 64,
                                  seed=job.config.seed)
    episode_grid(source.episode(0)).save(job.out / f"episode_{spec.replace(':', '_')}.png")


def measure_loader(job: Job) -> None:
  config = job.config
  train = loader.episode_source(config, "train", domains=[job.domains["glyphs:id"]])
  stats = job.summary["episode_stats"] = loader.describe_plans(train, 200)
  speed = job.summary["loader"] = loader.throughput(train, config.data.meta_batch_size,
                                                    num_batches=25,
                                                    num_threads=config.data.loader_threads)
  print(f"  {stats['ways_mean']:.1f} ways and {stats['support_mean']:.0f} support images per "
        f"episode on average; {speed['episodes_per_s']:.1f} episodes/s with "
        f"{config.data.loader_threads} threads")


def pretrain_backbone(job: Job) -> None:
  start = time.perf_counter()
  result = pretrain.pretrain(job.configs["pretrain"], str(job.out / "pretrain"))
  job.summary["pretrain"] = {"backbone": str(job.out / "pretrain" / "backbone"),
                             "seconds": time.perf_counter() - start,
                             "fewshot": result["report"]}
  print(result["table"])


def meta_train(job: Job) -> None:
  job.summary["meta_train"] = {}
  for method in META_CONFIGS:
    start = time.perf_counter()
    trained = metatrain.train_and_evaluate(job.configs[method], str(job.out / method))
    job.summary["meta_train"][method] = {**trained, "seconds": time.perf_counter() - start}
    job.runs[method] = metatrain.load_run(str(job.out / method))


def compare(job: Job) -> None:
  """Pre, PMF and SMAT zero-shot on the same protocols → results.json / results.md."""
  config, runs = job.config, job.runs
  groups = {spec: [job.domains[spec]] for spec in EVAL_SPECS}
  models = {"Pre": (runs["pmf"].theta_pre, runs["pmf"].hp.vit), "PMF": runs["pmf"],
            "SMAT": runs["smat"]}
  protocols = evaluate.fixed_protocols(config.data.image_size, ways=5, shots=(1, 5),
                                       queries=15, episodes=job.comparison_episodes,
                                       seed=config.seed,
                                       resize_ratio=config.data.get("test_resize_ratio"))
  reports = {}
  for name, model in models.items():
    start = time.perf_counter()
    reports[name] = evaluate.report(model, groups, protocols)
    print(f"  {name}: {time.perf_counter() - start:.0f} s")
  described = next(iter(protocols.values())).describe()
  evaluated = {name.upper(): metatrain.describe_checkpoint(str(job.out / name), run)
               for name, run in runs.items()}
  table = (evaluate.comparison_table(reports, ID_SPECS, OOD_SPECS) + "\n\n"
           + evaluated_models_note(evaluated, runs["smat"].hp.experts.target_sparsity))
  results = {"evaluated": evaluated, "methods": reports,
             "averages": {m: evaluate.averages(r, ID_SPECS, OOD_SPECS) for m, r in reports.items()},
             "id_domains": list(ID_SPECS), "ood_domains": list(OOD_SPECS),
             # The fields the protocols share, at the top as `experiments.paired` reads them.
             **{k: described[k] for k in ("episodes", "ways", "queries", "seed",
                                          "reserved_episodes")},
             "protocols": {k: p.describe() for k, p in protocols.items()},
             "software": evaluate.software_versions(), "table": table}
  (job.out / "results.json").write_text(json.dumps(results, indent=1))
  (job.out / "results.md").write_text(table + "\n")
  job.summary["results"] = str(job.out / "results.json")
  print(table)


def draw_figures(job: Job) -> None:
  groups = {spec: [job.domains[spec]] for spec in EVAL_SPECS}
  figures = plots.write_run_figures(job.runs["smat"], str(job.out / "figures"), groups,
                                    FixedSampler(5, 5, 15), job.config.data.image_size,
                                    episodes=50, seed=job.config.seed)
  job.summary["figures"] = [str(job.out / "figures" / name) for name in figures]


class Stage(NamedTuple):
  title: Callable  # Job -> the line printed when the stage starts
  run: Callable  # Job -> None; resumes (cached builds, training from its checkpoints)


STAGES = (
    Stage(lambda job: f"offline benchmark in {job.data_dir}", build_data),
    Stage(lambda job: "domains", describe_domains),
    Stage(lambda job: "episode loader (meta-training stream, glyphs:id train classes)",
          measure_loader),
    Stage(lambda job: "pre-training the backbone θ_pre (resumes from its checkpoints)",
          pretrain_backbone),
    Stage(lambda job: "meta-training PMF and SMAT on θ_pre (resumes from their checkpoints)",
          meta_train),
    Stage(lambda job: f"zero-shot comparison on identical episodes ({job.comparison_episodes} "
                      f"per cell)", compare),
    Stage(lambda job: "figures of the SMAT run: mask density per block/type/expert, expert "
                      "choice", draw_figures),
)


def reproduce(workdir: str = DEFAULT_WORKDIR, data_dir: str | None = None,
              config_path: str = "glyphs_small",
              pretrain_config_path: str = "pretrain_glyphs",
              meta_variant: str = "", comparison_episodes: int = 200,
              overrides: Sequence[str] = ()) -> dict:
  """Runs every stage into `workdir`; `meta_variant` (e.g. "smoke") shrinks meta-training;
  `overrides` (--config.FIELD=VALUE) go to every stage config that has the field."""
  meta_paths = {m: f"{p}:{meta_variant}" if meta_variant else p for m, p in META_CONFIGS.items()}
  configs = stage_configs({"episodes": config_path, "pretrain": pretrain_config_path,
                           **meta_paths}, overrides)
  data_dir = data_dir or configs["episodes"].data_dir or default_data_dir()
  out = Path(workdir)
  backbone = out / "pretrain" / "backbone"
  own = {"episodes": [f"data_dir={data_dir}"],
         "pretrain": [f"data_dir={data_dir}", f"eval.domains={','.join(EVAL_SPECS)}"],
         **{m: [f"data_dir={data_dir}", f"backbone.path={backbone}"] for m in META_CONFIGS}}
  for stage, fields in own.items():
    for field in fields:
      config_lib.apply_override(configs[stage], field)
  out.mkdir(parents=True, exist_ok=True)
  job = Job(out, configs, data_dir, comparison_episodes)
  for number, stage in enumerate(STAGES, 1):
    print(f"[{number}/{len(STAGES)}] {stage.title(job)}")
    stage.run(job)
  (out / "summary.json").write_text(json.dumps(job.summary, indent=1))
  print(f"wrote {out / 'results.json'}, {out / 'summary.json'}, example episodes "
        f"{out}/episode_*.png, figures {out}/figures; runs: {out}/pretrain, {out}/pmf, "
        f"{out}/smat")
  return job.summary
