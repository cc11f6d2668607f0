"""End to end: the README's main job on the real offline benchmark (full glyphs build)."""

import json
from pathlib import Path

import pytest

from smat import pipeline
from smat.data.sources import fashion_mnist


@pytest.mark.skipif(not Path(fashion_mnist.DEFAULT_DIR).exists(),
                    reason="needs Debian's dataset-fashion-mnist (bootstrap.sh installs it)")
def test_reproduce_builds_describes_and_measures(tmp_path):
  summary = pipeline.reproduce(str(tmp_path / "run"), str(tmp_path / "data"),
                               pretrain_config_path="configs/pretrain_glyphs.py:smoke")
  domains = summary["domains"]
  assert domains["glyphs:id"]["splits"]["train"]["num_classes"] > 1000
  assert domains["glyphs:ood"]["splits"]["train"]["num_classes"] == 0
  assert domains["glyphs:ood"]["num_classes"] > 300
  assert domains["fashion_mnist"]["num_images"] == 10000
  stats = summary["episode_stats"]
  assert 5 <= stats["ways_min"] and stats["ways_max"] <= 50 and stats["query_mean"] > 0
  assert summary["loader"]["episodes_per_s"] > 0
  written = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert written["glyphs_build"] == summary["glyphs_build"]
  fewshot = summary["pretrain"]["fewshot"]
  assert set(fewshot) == {"glyphs:id", "glyphs:ood", "fashion_mnist"}
  assert all(0 <= cell["accuracy"] <= 100 for row in fewshot.values() for cell in row.values())
  assert (tmp_path / "run" / "pretrain" / "backbone" / "backbone.json").exists()
  assert sorted(p.name for p in (tmp_path / "run").glob("episode_*.png")) == [
      "episode_fashion_mnist.png", "episode_glyphs_id.png", "episode_glyphs_ood.png"]
