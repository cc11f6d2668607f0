"""The main job on the offline benchmark (`smat reproduce`).

Stages: build the benchmark's sources → describe every evaluation domain → draw example
episodes → measure the episode loader → pre-train the small backbone θ_pre on its pool →
meta-train PMF, SoftMerge and SMAT on top of it → zero-shot comparison of Pre and the three on
identical episodes, in distribution (the ID sources' test classes) and out of distribution
(held-out domains) → figures of the SMAT run (`figures/`: mask density per block and parameter
type, expert choice per domain, specialisation). `BENCHMARKS` names what each benchmark builds,
trains and compares on: `offline` (glyphs, emoji and icons; the default) or `glyphs` alone.
Every stage writes into the workdir, one directory per method (`pretrain/`, `pmf/`,
`softmerge/`, `smat/`); `results.json` / `results.md` hold the comparison and `summary.json`
every figure.
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
from smat.data.spec import default_data_dir, load_domain
from smat.errors import SmatError


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """What the main job builds (`smat data prepare` of each source), pre-trains, meta-trains
  (method → config, in the table's column order) and compares on (ID and OOD SPECs)."""

  sources: tuple[str, ...]
  id_specs: tuple[str, ...]
  ood_specs: tuple[str, ...]
  meta_configs: dict

  @property
  def eval_specs(self) -> tuple[str, ...]:
    return self.id_specs + self.ood_specs


BENCHMARKS = {
    "offline": Benchmark(("glyphs", "emoji", "icons"), ("glyphs:id", "emoji:id", "icons:id"),
                         ("glyphs:ood", "emoji:ood", "fashion_mnist"),
                         {"pmf": "pmf_offline", "softmerge": "softmerge_offline",
                          "smat": "smat_offline"}),
    "glyphs": Benchmark(("glyphs",), ("glyphs:id",), ("glyphs:ood", "fashion_mnist"),
                        {"pmf": "pmf_glyphs", "softmerge": "softmerge_glyphs",
                         "smat": "smat_glyphs"}),
}
DEFAULT_WORKDIR = "runs/demo"  # the packaged configs' backbone.path is its pretrain/backbone
# Fields the job sets itself (overriding them would split the stages' inputs), and what to use.
JOB_FIELDS = {"data_dir": "--data-dir",
              "backbone.path": "--workdir (the backbone is <workdir>/pretrain/backbone)",
              "eval.domains": "nothing: the job compares on its benchmark's domains"}


def evaluated_models_note(evaluated: dict, tau: float) -> str:
  """One line per meta-trained column: the checkpoint it evaluates (step, epoch, validation
  accuracy) and, for SMAT, the deployed sparsity of each expert beside τ."""
  lines = []
  for name, d in evaluated.items():
    epochs = f"{d['epoch']} epoch" + ("" if d["epoch"] == 1 else "s")
    line = (f"{name}: best checkpoint, step {d['step']} (after {epochs}), validation "
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
  benchmark: Benchmark
  summary: dict = dataclasses.field(default_factory=dict)
  domains: dict = dataclasses.field(default_factory=dict)
  runs: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    """The episode-stream config (seed, image size, sampler)."""
    return self.configs["episodes"]


def build_source(name: str, data_dir: str) -> Path:
  """`smat data prepare NAME` with its default config (cached: instant when built)."""
  from smat.data.sources import emoji, glyphs, icons

  builders = {"glyphs": lambda: glyphs.build(data_dir),
              "emoji": lambda: emoji.build(data_dir, emoji.EmojiConfig()),
              "icons": lambda: icons.build(data_dir, icons.IconsConfig())}
  return builders[name]()


def build_data(job: Job) -> None:
  builds = {name: str(build_source(name, job.data_dir)) for name in job.benchmark.sources}
  job.summary.update(data_dir=job.data_dir, builds=builds, domains={})


def describe_domains(job: Job) -> None:
  """Each evaluation domain's size per split and an example episode picture."""
  job.domains = {spec: load_domain(spec, job.data_dir) for spec in job.benchmark.eval_specs}
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
  train = loader.episode_source(config, "train",
                                domains=[job.domains[s] for s in job.benchmark.id_specs])
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
  for method in job.benchmark.meta_configs:
    start = time.perf_counter()
    trained = metatrain.train_and_evaluate(job.configs[method], str(job.out / method))
    job.summary["meta_train"][method] = {**trained, "seconds": time.perf_counter() - start}
    job.runs[method] = metatrain.load_run(str(job.out / method))


def compare(job: Job) -> None:
  """θ_pre ("Pre") and each meta-trained method zero-shot on the same protocols →
  results.json / results.md."""
  config, runs, bench = job.config, job.runs, job.benchmark
  groups = {spec: [job.domains[spec]] for spec in bench.eval_specs}
  any_run = next(iter(runs.values()))
  models = {evaluate.METHOD_LABELS["pre"]: (any_run.theta_pre, any_run.hp.vit),
            **{evaluate.METHOD_LABELS[method]: runs[method] for method in bench.meta_configs}}
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
  evaluated = {evaluate.METHOD_LABELS[method]: metatrain.describe_checkpoint(
      str(job.out / method), run) for method, run in runs.items()}
  table = (evaluate.comparison_table(reports, bench.id_specs, bench.ood_specs) + "\n\n"
           + evaluated_models_note(evaluated, runs["smat"].hp.experts.target_sparsity))
  results = {"evaluated": evaluated, "methods": reports,
             "averages": {m: evaluate.averages(r, bench.id_specs, bench.ood_specs)
                          for m, r in reports.items()},
             "id_domains": list(bench.id_specs), "ood_domains": list(bench.ood_specs),
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
  groups = {spec: [job.domains[spec]] for spec in job.benchmark.eval_specs}
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
    Stage(lambda job: f"episode loader (meta-training stream, train classes of "
                      f"{', '.join(job.benchmark.id_specs)})", measure_loader),
    Stage(lambda job: "pre-training the backbone θ_pre (resumes from its checkpoints)",
          pretrain_backbone),
    Stage(lambda job: "meta-training " + ", ".join(evaluate.METHOD_LABELS[m]
                                                   for m in job.benchmark.meta_configs)
                      + " on θ_pre (resumes from their checkpoints)", meta_train),
    Stage(lambda job: f"zero-shot comparison on identical episodes ({job.comparison_episodes} "
                      f"per cell)", compare),
    Stage(lambda job: "figures of the SMAT run: mask density per block/type/expert, expert "
                      "choice, specialisation", draw_figures),
)


def reproduce(workdir: str = DEFAULT_WORKDIR, data_dir: str | None = None,
              config_path: str = "glyphs_small",
              pretrain_config_path: str = "pretrain_glyphs",
              meta_variant: str = "", comparison_episodes: int = 200,
              overrides: Sequence[str] = (), benchmark: str = "offline") -> dict:
  """Runs every stage of `BENCHMARKS[benchmark]` into `workdir`; `meta_variant` (e.g. "smoke")
  shrinks meta-training; `overrides` (--config.FIELD=VALUE) go to every stage config that has
  the field."""
  if benchmark not in BENCHMARKS:
    raise SmatError(f"--benchmark {benchmark}: choose one of {', '.join(BENCHMARKS)}")
  bench = BENCHMARKS[benchmark]
  meta_paths = {m: f"{p}:{meta_variant}" if meta_variant else p
                for m, p in bench.meta_configs.items()}
  configs = stage_configs({"episodes": config_path, "pretrain": pretrain_config_path,
                           **meta_paths}, overrides)
  data_dir = data_dir or configs["episodes"].data_dir or default_data_dir()
  out = Path(workdir)
  backbone = out / "pretrain" / "backbone"
  own = {"episodes": [f"data_dir={data_dir}"],
         "pretrain": [f"data_dir={data_dir}", f"eval.domains={','.join(bench.eval_specs)}"],
         **{m: [f"data_dir={data_dir}", f"backbone.path={backbone}"] for m in meta_paths}}
  for stage, fields in own.items():
    for field in fields:
      config_lib.apply_override(configs[stage], field)
  out.mkdir(parents=True, exist_ok=True)
  job = Job(out, configs, data_dir, comparison_episodes, bench)
  for number, stage in enumerate(STAGES, 1):
    print(f"[{number}/{len(STAGES)}] {stage.title(job)}")
    stage.run(job)
  (out / "summary.json").write_text(json.dumps(job.summary, indent=1))
  print(f"wrote {out / 'results.json'}, {out / 'summary.json'}, example episodes "
        f"{out}/episode_*.png, figures {out}/figures; runs: {out}/pretrain, "
        + ", ".join(f"{out}/{method}" for method in bench.meta_configs))
  return job.summary
