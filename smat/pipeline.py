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

import json
import time
from collections.abc import Sequence
from pathlib import Path

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
  config = configs["episodes"]
  data_dir = data_dir or config.data_dir or default_data_dir()
  out = Path(workdir)
  backbone = out / "pretrain" / "backbone"
  own = {"episodes": [f"data_dir={data_dir}"],
         "pretrain": [f"data_dir={data_dir}", f"eval.domains={','.join(EVAL_SPECS)}"],
         **{m: [f"data_dir={data_dir}", f"backbone.path={backbone}"] for m in META_CONFIGS}}
  for stage, fields in own.items():
    for field in fields:
      config_lib.apply_override(configs[stage], field)
  out.mkdir(parents=True, exist_ok=True)

  print(f"[1/7] offline benchmark in {data_dir}")
  build_dir = glyphs.build(data_dir)
  summary = {"data_dir": data_dir, "glyphs_build": str(build_dir), "domains": {}}

  print("[2/7] domains")
  domains = {spec: load_domain(spec, data_dir) for spec in EVAL_SPECS}
  for spec, domain in domains.items():
    described = domain.describe()
    summary["domains"][spec] = {k: described[k] for k in ("num_classes", "num_images", "splits")}
    splits = ", ".join(f"{s} {v['num_classes']}" for s, v in described["splits"].items()
                       if v["num_classes"])
    print(f"  {spec:14s} {described['num_classes']:5d} classes ({splits}), "
          f"{described['num_images']} images")
    split = "train" if domain.classes("train") else "test"
    source = loader.EpisodeSource((domain,), split, loader.make_sampler(config.data), 64,
                                  seed=config.seed)
    picture = out / f"episode_{spec.replace(':', '_')}.png"
    episode_grid(source.episode(0)).save(picture)

  print("[3/7] episode loader (meta-training stream, glyphs:id train classes)")
  train = loader.episode_source(config, "train", domains=[domains["glyphs:id"]])
  summary["episode_stats"] = loader.describe_plans(train, 200)
  summary["loader"] = loader.throughput(train, config.data.meta_batch_size, num_batches=25,
                                        num_threads=config.data.loader_threads)
  print(f"  {summary['episode_stats']['ways_mean']:.1f} ways and "
        f"{summary['episode_stats']['support_mean']:.0f} support images per episode on average; "
        f"{summary['loader']['episodes_per_s']:.1f} episodes/s with "
        f"{config.data.loader_threads} threads")

  print("[4/7] pre-training the backbone θ_pre (resumes from its checkpoints)")
  start = time.perf_counter()
  result = pretrain.pretrain(configs["pretrain"], str(out / "pretrain"))
  summary["pretrain"] = {"backbone": str(backbone),
                         "seconds": time.perf_counter() - start, "fewshot": result["report"]}
  print(result["table"])

  print("[5/7] meta-training PMF and SMAT on θ_pre (resumes from their checkpoints)")
  runs, summary["meta_train"] = {}, {}
  for method in META_CONFIGS:
    start = time.perf_counter()
    trained = metatrain.train_and_evaluate(configs[method], str(out / method))
    summary["meta_train"][method] = {**trained, "seconds": time.perf_counter() - start}
    runs[method] = metatrain.load_run(str(out / method))

  print(f"[6/7] zero-shot comparison on identical episodes ({comparison_episodes} per cell)")
  groups = {spec: [domains[spec]] for spec in EVAL_SPECS}
  models = {"Pre": (runs["pmf"].theta_pre, runs["pmf"].hp.vit), "PMF": runs["pmf"],
            "SMAT": runs["smat"]}
  reports = {}
  for name, model in models.items():
    start = time.perf_counter()
    reports[name] = evaluate.zero_shot_report(
        model, groups, config.data.image_size, shots=(1, 5), episodes=comparison_episodes,
        seed=config.seed, resize_ratio=config.data.get("test_resize_ratio"))
    print(f"  {name}: {time.perf_counter() - start:.0f} s")
  evaluated = {name.upper(): metatrain.describe_checkpoint(str(out / name), run)
               for name, run in runs.items()}
  table = (evaluate.comparison_table(reports, ID_SPECS, OOD_SPECS) + "\n\n"
           + evaluated_models_note(evaluated, runs["smat"].hp.target_sparsity))
  results = {"evaluated": evaluated, "methods": reports,
             "averages": {m: evaluate.averages(r, ID_SPECS, OOD_SPECS) for m, r in reports.items()},
             "id_domains": list(ID_SPECS), "ood_domains": list(OOD_SPECS),
             "episodes": comparison_episodes, "ways": 5, "queries": 15, "seed": config.seed,
             "software": evaluate.software_versions(), "table": table}
  (out / "results.json").write_text(json.dumps(results, indent=1))
  (out / "results.md").write_text(table + "\n")
  summary["results"] = str(out / "results.json")
  print(table)

  print("[7/7] figures of the SMAT run: mask density per block/type/expert, expert choice")
  figures = plots.write_run_figures(runs["smat"], str(out / "figures"), groups,
                                    FixedSampler(5, 5, 15), config.data.image_size,
                                    episodes=50, seed=config.seed)
  summary["figures"] = [str(out / "figures" / name) for name in figures]
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {out / 'results.json'}, {out / 'summary.json'}, example episodes "
        f"{out}/episode_*.png, figures {out}/figures; runs: {out}/pretrain, {out}/pmf, "
        f"{out}/smat")
  return summary
