"""End to end: the README's main job on the real offline benchmark (full glyphs build)."""

import json
from pathlib import Path

import pytest

from smat import pipeline
from smat.data.sources import fashion_mnist


@pytest.mark.skipif(not Path(fashion_mnist.DEFAULT_DIR).exists(),
                    reason="needs Debian's dataset-fashion-mnist (bootstrap.sh installs it)")
def test_reproduce_builds_trains_and_compares(tmp_path):
  summary = pipeline.reproduce(str(tmp_path / "run"), str(tmp_path / "data"),
                               pretrain_config_path="pretrain_glyphs:smoke",
                               meta_variant="smoke", comparison_episodes=4, benchmark="glyphs")
  domains = summary["domains"]
  assert domains["glyphs:id"]["splits"]["train"]["num_classes"] > 700
  assert domains["glyphs:id"]["splits"]["pool"]["num_classes"] > 700
  assert domains["glyphs:ood"]["splits"]["train"]["num_classes"] == 0
  assert domains["glyphs:ood"]["num_classes"] > 300
  assert domains["fashion_mnist"]["num_images"] == 10000
  stats = summary["episode_stats"]
  assert 5 <= stats["ways_min"] and stats["ways_max"] <= 50 and stats["query_mean"] > 0
  assert summary["loader"]["episodes_per_s"] > 0
  written = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert written["builds"] == summary["builds"] and set(summary["builds"]) == {"glyphs"}
  fewshot = summary["pretrain"]["fewshot"]
  assert set(fewshot) == {"glyphs:id", "glyphs:ood", "fashion_mnist"}
  assert all(0 <= cell["accuracy"] <= 100 for row in fewshot.values() for cell in row.values())
  assert (tmp_path / "run" / "pretrain" / "backbone" / "backbone.json").exists()
  assert sorted(p.name for p in (tmp_path / "run").glob("episode_*.png")) == [
      "episode_fashion_mnist.png", "episode_glyphs_id.png", "episode_glyphs_ood.png"]
  for method in ("pmf", "softmerge", "smat"):
    assert (tmp_path / "run" / method / "checkpoints").is_dir()
    assert summary["meta_train"][method]["stopped_at"] == summary["meta_train"][method]["total_steps"]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert list(results["methods"]) == ["Pre", "PMF", "SoftMerge", "SMAT"]
  for report in results["methods"].values():
    assert set(report) == {"glyphs:id", "glyphs:ood", "fashion_mnist"}
    for row in report.values():
      assert set(row) == {"5w1s", "5w5s"}
      assert all(0 <= cell["accuracy"] <= 100 and cell["episodes"] == 4 for cell in row.values())
  for routed in ("SoftMerge", "SMAT"):
    assert len(results["methods"][routed]["glyphs:ood"]["5w1s"]["alpha_mean"]) == 2
  pre_id = results["methods"]["Pre"]["glyphs:id"]["5w5s"]["accuracy"]
  assert results["averages"]["Pre"]["id"]["5w5s"] == pre_id
  assert "| **OOD average** | 5w1s |" in results["table"]
  # The table names what it evaluates.
  for name, method in (("PMF", "pmf"), ("SoftMerge", "softmerge"), ("SMAT", "smat")):
    evaluated, best = results["evaluated"][name], summary["meta_train"][method]["best"]
    assert evaluated["step"] == best["step"]
    assert evaluated["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert f"{name}: best checkpoint, step {best['step']} " in results["table"]
  assert results["evaluated"]["PMF"]["sparsity"] is None
  assert results["evaluated"]["SoftMerge"]["sparsity"] is None
  assert len(results["evaluated"]["SMAT"]["sparsity"]["deployed"]) == 2
  figures = tmp_path / "run" / "figures"
  assert {"mask_density.png", "mask_density_expected.png", "expert_choice.png"} <= {
      p.name for p in figures.glob("*.png")}
  choice = json.loads((figures / "expert_choice.json").read_text())
  assert set(choice) == {"glyphs:id", "glyphs:ood", "fashion_mnist"}
  assert all(len(alpha) == 2 and abs(sum(alpha) - 1) < 1e-5 for alpha in choice.values())
  density = json.loads((figures / "mask_density.json").read_text())["mask_density"]
  measured = json.loads((figures / "specialisation.json").read_text())
  assert 0 <= measured["routing_information"]["normalised"] <= 1
  assert len(measured["mask_overlap"]["jaccard"]) == 2
  assert all(0 <= d <= 1 for d in density["by_block"])
