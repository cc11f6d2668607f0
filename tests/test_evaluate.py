"""`smat evaluate`: JSON schema, the same episodes as the library evaluator, ID/OOD averages."""

import json

import numpy as np
import pytest

from smat import cli, fewshot
from smat.data import loader
from smat.data.samplers import FixedSampler
from smat.data.spec import load_domains
from smat.models import checkpoint, vit

CFG = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)


def _evaluate(data_dir, backbone, out, *extra):
  return cli.main(["evaluate", "--method", "pre", "--backbone", backbone,
                   "--domains", "glyphs:id,glyphs:ood", "--id-domains", "glyphs:id",
                   "--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "6",
                   "--seed", "3", "--data-dir", str(data_dir), "--out", str(out), *extra])


def test_evaluate_pre_writes_the_schema_and_matches_the_library(glyphs_data_dir, backbone,
                                                                 tmp_path, capsys):
  data_dir, _, _ = glyphs_data_dir
  assert _evaluate(data_dir, backbone, tmp_path / "r.json") == 0
  result = json.loads((tmp_path / "r.json").read_text())
  assert {"method", "adapt", "episodes", "seed", "domains", "averages", "id_domains",
          "ood_domains", "software", "table"} <= set(result)
  assert result["method"] == "pre" and result["adapt"] == "zero-shot"
  assert result["reserved_episodes"] == 5 and result["finetune"] is None
  assert result["id_domains"] == ["glyphs:id"] and result["ood_domains"] == ["glyphs:ood"]
  software = result["software"]  # everything a result's last bits depend on
  for name in ("jax", "jaxlib", "numpy", "grain", "tensorflow-datasets", "pillow", "fonttools",
               "freetype"):
    assert software[name], name
  assert software["device"]["kind"] and "usable_cores" in software["threads"]
  for spec in ("glyphs:id", "glyphs:ood"):
    row = result["domains"][spec]
    assert row["episodes"] == 6 and row["ways_mean"] == 3 and row["shots_mean"] == 1
    params, config = checkpoint.load(backbone)
    # The first 5 episodes are reserved for the fine-tuning lr search, in every mode.
    source = loader.EpisodeSource(tuple(load_domains(spec, str(data_dir))), "test",
                                  FixedSampler(3, 1, 1), 16, seed=3, first=5)
    expected = fewshot.zero_shot(params, config, source, 6)
    assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert row["ci95"] == pytest.approx(expected["ci95"], abs=1e-9)
  assert result["averages"]["id"] == result["domains"]["glyphs:id"]["accuracy"]
  assert result["averages"]["ood"] == result["domains"]["glyphs:ood"]["accuracy"]
  assert "| glyphs:ood (OOD) |" in capsys.readouterr().out
  # Another seed draws other episodes.
  assert _evaluate(data_dir, backbone, tmp_path / "s.json", "--seed", "4") == 0
  other = json.loads((tmp_path / "s.json").read_text())
  assert other["seed"] == 4


def test_evaluate_needs_a_backbone_or_a_run(tmp_path, capsys):
  code = cli.main(["evaluate", "--method", "pre", "--domains", "glyphs:id",
                   "--out", str(tmp_path / "r.json")])
  assert code == 2 and "--backbone" in capsys.readouterr().err
  code = cli.main(["evaluate", "--workdir", str(tmp_path), "--domains", "glyphs:id",
                   "--out", str(tmp_path / "r.json")])
  assert code == 2 and "config.json" in capsys.readouterr().err


def test_an_image_folder_is_evaluated_as_ood_zero_shot_and_fine_tuned(backbone, tmp_path):
  """`folder:<path>` works like any domain: OOD by default, zero-shot or fine-tuned."""
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(0)
  for c in range(3):
    (tmp_path / "shapes" / f"class{c}").mkdir(parents=True)
    base = rng.integers(0, 256, (3,))
    for i in range(4):
      pixels = np.clip(base + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(tmp_path / "shapes" / f"class{c}" / f"{i}.png")
  spec = f"folder:{tmp_path / 'shapes'}"
  for adapt in ("zero-shot", "full"):
    out = tmp_path / f"{adapt}.json"
    code = cli.main(["evaluate", "--method", "pre", "--backbone", backbone, "--domains", spec,
                     "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "2",
                     "--adapt", adapt, "--finetune-steps", "1", "--lrs", "0,1e-3",
                     "--lr-search-episodes", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["ood_domains"] == [spec] and result["id_domains"] == []
    row = result["domains"][spec]
    assert row["episodes"] == 2 and row["ways_mean"] == 3 and 0 <= row["accuracy"] <= 100
  # Distinct colours per class: well above the 33% of chance, zero-shot.
  assert json.loads((tmp_path / "zero-shot.json").read_text())["domains"][spec]["accuracy"] > 50


@pytest.mark.parametrize("cached", [True, False], ids=["feature-table", "per-episode"])
def test_a_protocol_reports_the_episodes_after_its_reserve(glyphs_data_dir, backbone, cached,
                                                           monkeypatch):
  """Reserving r episodes reports stream episodes r, r+1, …: the same per-episode accuracies as
  the tail of a protocol that reserves none, on either frozen-backbone route."""
  from smat import evaluate

  monkeypatch.setattr(fewshot, "worth_caching", lambda source, episodes: cached)
  data_dir, _, _ = glyphs_data_dir
  model = checkpoint.load(backbone)
  groups = {"glyphs:ood": load_domains("glyphs:ood", str(data_dir))}
  sampler = FixedSampler(3, 1, 2)
  whole = evaluate.Protocol(sampler, 16, episodes=7, seed=3, reserved=0)
  tail = evaluate.Protocol(sampler, 16, episodes=4, seed=3, reserved=3)
  everything = evaluate.evaluate(model, groups, whole, progress=False)["glyphs:ood"]
  after = evaluate.evaluate(model, groups, tail, progress=False)["glyphs:ood"]
  assert after["episodes"] == 4
  np.testing.assert_allclose(after["per_episode"], everything["per_episode"][3:], atol=1e-3)


def test_a_report_is_evaluate_on_each_protocol(glyphs_data_dir, backbone):
  """`report`'s cells are `evaluate`'s results on each protocol (features shared between the
  protocols change no number), labelled as `fixed_protocols` names them."""
  from smat import evaluate

  data_dir, _, _ = glyphs_data_dir
  model = checkpoint.load(backbone)
  groups = {spec: load_domains(spec, str(data_dir)) for spec in ("glyphs:id", "glyphs:ood")}
  protocols = evaluate.fixed_protocols(16, ways=3, shots=(1, 2), queries=2, episodes=5, seed=1)
  assert list(protocols) == ["3w1s", "3w2s"]
  assert protocols["3w2s"].describe()["shots"] == 2
  assert protocols["3w2s"].describe()["reserved_episodes"] == 5
  report = evaluate.report(model, groups, protocols, progress=False)
  assert list(report) == ["glyphs:id", "glyphs:ood"] and list(report["glyphs:id"]) == ["3w1s", "3w2s"]
  for label, protocol in protocols.items():
    alone = evaluate.evaluate(model, groups, protocol, progress=False)
    for spec in groups:
      assert report[spec][label]["per_episode"] == alone[spec]["per_episode"]
      assert report[spec][label]["accuracy"] == alone[spec]["accuracy"]
