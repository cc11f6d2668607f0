"""experiments.paired: per-episode differences of two main-job results on the same episodes."""

import numpy as np
import pytest

from experiments import paired


def _results(per_episode, seed=0):
  cell = {"accuracy": float(np.mean(per_episode)), "per_episode": per_episode}
  return {"episodes": len(per_episode), "ways": 5, "queries": 15, "seed": seed,
          "methods": {"SMAT": {"glyphs:id": {"5w1s": cell}}}}


def test_paired_difference_is_the_mean_and_ci_of_the_episode_differences():
  old, new = [50.0, 60.0, 70.0, 80.0], [55.0, 60.0, 80.0, 85.0]
  (mean, ci), = [v for d in paired.differences(_results(old), _results(new))["SMAT"].values()
                 for v in d.values()]
  d = np.array([5.0, 0.0, 10.0, 5.0])
  assert mean == pytest.approx(5.0)
  assert ci == pytest.approx(1.96 * d.std() / 2.0)


def test_results_of_other_episodes_are_refused():
  with pytest.raises(SystemExit, match="seed"):
    paired.differences(_results([1.0, 2.0]), _results([1.0, 2.0], seed=1))
  # A protocol that reserves lr-search episodes reports other episodes than one that does not
  # (a result without the field reported from episode 0).
  reserved = {**_results([1.0, 2.0]), "reserved_episodes": 5}
  with pytest.raises(SystemExit, match="reserved_episodes"):
    paired.differences(_results([1.0, 2.0]), reserved)
  assert paired.differences(reserved, dict(reserved))


def test_between_methods_of_one_result_on_its_identical_episodes(tmp_path):
  result = _results([50.0, 60.0, 70.0, 80.0])
  result["methods"]["Pre"] = {"glyphs:id": {"5w1s": {"per_episode": [40.0, 60.0, 75.0, 70.0]}}}
  mean, ci = paired.between(result, [("SMAT", "Pre")])["SMAT − Pre"]["glyphs:id"]["5w1s"]
  d = np.array([10.0, 0.0, -5.0, 10.0])
  assert mean == pytest.approx(d.mean()) and ci == pytest.approx(1.96 * d.std() / 2.0)
  with pytest.raises(SystemExit, match="no method 'PMF'"):
    paired.between(result, [("SMAT", "PMF")])
  import json

  (tmp_path / "r.json").write_text(json.dumps(result))
  assert paired.main([str(tmp_path / "r.json"), "--between", "SMAT-Pre",
                      "--out", str(tmp_path / "d")]) == 0
  assert "| glyphs:id | 5w1s | +3.75 ± " in (tmp_path / "d.md").read_text()


def test_tables_outputs_of_each_shot_count_read_as_one_main_job_result(tmp_path):
  import json

  def table(shots, per_episode, seed=0, modes="zero-shot"):
    path = tmp_path / f"t{shots}s_{seed}_{modes.replace(',', '+')}.json"  # paths join by commas
    args = {"episodes": len(per_episode), "ways": 5, "shots": shots, "queries": 15,
            "seed": seed, "lr_search_episodes": 5, "modes": modes}
    path.write_text(json.dumps({"args": args, "cells": {
        "SMAT": {"glyphs:id": {"per_episode": per_episode}}}}))
    return str(path)

  joined = paired.load(f"{table(1, [50.0, 70.0])},{table(5, [80.0, 90.0])}")
  assert joined["methods"]["SMAT"]["glyphs:id"]["5w5s"]["per_episode"] == [80.0, 90.0]
  assert (joined["episodes"], joined["reserved_episodes"]) == (2, 5)
  main_job = {**_results([40.0, 90.0]), "reserved_episodes": 5}
  main_job["methods"]["SMAT"]["glyphs:id"]["5w5s"] = {"per_episode": [85.0, 85.0]}
  diff = paired.differences(main_job, joined)["SMAT"]["glyphs:id"]
  assert diff["5w1s"][0] == pytest.approx(-5.0) and diff["5w5s"][0] == pytest.approx(0.0)
  with pytest.raises(SystemExit, match="different episodes"):
    paired.load(f"{table(1, [50.0, 70.0])},{table(5, [80.0, 90.0], seed=1)}")
  with pytest.raises(SystemExit, match="fine-tuned columns"):
    paired.load(table(1, [50.0, 70.0], modes="zero-shot,full"))
