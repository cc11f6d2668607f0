"""The main job on the offline benchmark (`smat reproduce`).

Stages: build the glyphs benchmark → describe every evaluation domain → draw example episodes
→ measure the episode loader → pre-train the small backbone θ_pre and report its zero-shot
few-shot accuracy. Every stage writes into the workdir (`pretrain/backbone` is θ_pre);
`summary.json` collects the figures. Re-running resumes: finished stages are cached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from smat import config as config_lib
from smat import pretrain
from smat.data import loader
from smat.data.show import episode_grid
from smat.data.sources import glyphs
from smat.data.spec import default_data_dir, load_domain

EVAL_SPECS = ("glyphs:id", "glyphs:ood", "fashion_mnist")


def reproduce(workdir: str, data_dir: str | None = None,
              config_path: str = "configs/glyphs_small.py",
              pretrain_config_path: str = "configs/pretrain_glyphs.py") -> dict:
  config = config_lib.load(config_path)
  data_dir = data_dir or config.data_dir or default_data_dir()
  with config.unlocked():
    config.data_dir = data_dir
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)

  print(f"[1/4] offline benchmark in {data_dir}")
  build_dir = glyphs.build(data_dir)
  summary = {"data_dir": data_dir, "glyphs_build": str(build_dir), "domains": {}}

  print("[2/4] domains")
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

  print("[3/4] episode loader (meta-training stream, glyphs:id train classes)")
  train = loader.episode_source(config, "train", domains=[domains["glyphs:id"]])
  summary["episode_stats"] = loader.describe_plans(train, 200)
  summary["loader"] = loader.throughput(train, config.data.meta_batch_size, num_batches=25,
                                        num_threads=config.data.loader_threads)
  print(f"  {summary['episode_stats']['ways_mean']:.1f} ways and "
        f"{summary['episode_stats']['support_mean']:.0f} support images per episode on average; "
        f"{summary['loader']['episodes_per_s']:.1f} episodes/s with "
        f"{config.data.loader_threads} threads")

  print("[4/4] pre-training the backbone θ_pre (resumes from its checkpoints)")
  pretrain_config = config_lib.load(pretrain_config_path, [
      f"data_dir={data_dir}", f"eval.domains={','.join(EVAL_SPECS)}"])
  start = time.perf_counter()
  result = pretrain.pretrain(pretrain_config, str(out / "pretrain"))
  summary["pretrain"] = {"backbone": str(out / "pretrain" / "backbone"),
                         "seconds": time.perf_counter() - start, "fewshot": result["report"]}
  print(result["table"])
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"wrote {out / 'summary.json'}, example episodes {out}/episode_*.png and the backbone "
        f"{out}/pretrain/backbone")
  return summary
