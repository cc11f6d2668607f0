"""experiments/tables.py: the paper-layout table from finished cells (averages, missing cells)."""

from experiments import tables


def _cell(accuracy, ci):
  return {"accuracy": accuracy, "ci95": ci}


def test_markdown_rows_averages_and_missing_cells():
  cells = {"Pre": {"a": _cell(60.0, 1.0), "b": _cell(50.0, 2.0), "c": _cell(40.0, 4.0)},
           "SMAT +full": {"a": _cell(70.0, 1.5), "b": _cell(55.0, 2.5)}}
  text = tables.markdown(cells, ["a"], ["b", "c"], ["Pre", "PMF", "SMAT +full"])
  lines = text.splitlines()
  assert lines[0] == "| domain | Pre | SMAT +full |"  # PMF has no cells: no column
  assert lines[2] == "| a (ID) | 60.00 ± 1.00 | 70.00 ± 1.50 |"
  assert lines[4] == "| c (OOD) | 40.00 ± 4.00 | — |"
  assert lines[5] == "| **ID average** | **60.00** ± 1.00 | **70.00** ± 1.50 |"
  # OOD average = mean of the OOD rows; incomplete columns show a dash, never a partial mean.
  assert lines[6] == "| **OOD average** | **45.00** ± 3.00 | — |"


def test_cell_names_follow_the_paper_columns():
  assert tables.cell_name("smat", "zero-shot") == "SMAT"
  assert tables.cell_name("softmerge", "lora") == "SoftMerge +LoRA"


def test_paired_differences_use_the_same_episodes():
  cells = {"SMAT": {"a": {"per_episode": [80.0, 60.0, 100.0]},
                    "b": {"per_episode": [50.0, 50.0]}},
           "PMF": {"a": {"per_episode": [60.0, 60.0, 60.0]},
                   "b": {"per_episode": [40.0, 60.0]}}}
  diffs = tables.paired(cells, "SMAT", "PMF", ["a", "b"])
  # a: differences 20, 0, 40 → mean 20, population std √(800/3), CI 1.96 · std / √3.
  assert diffs["a"][0] == 20.0
  assert abs(diffs["a"][1] - 1.96 * (800 / 3) ** 0.5 / 3 ** 0.5) < 1e-9
  assert diffs["b"] == (0.0, 1.96 * 10.0 / 2 ** 0.5)
  assert diffs["average"][0] == 10.0
  assert abs(diffs["average"][1] - (diffs["a"][1] ** 2 + diffs["b"][1] ** 2) ** 0.5 / 2) < 1e-9
  assert "average" not in tables.paired(cells, "SMAT", "PMF", ["a", "b", "c"])
  text = tables.paired_markdown(cells, ["a"], ["b"], [("SMAT", "PMF")])
  assert "| a (ID) | +20.00 ±" in text and "| **OOD average** | +0.00 ±" in text
  assert tables.comparison_pairs(["SMAT", "PMF", "SMAT +full", "SoftMerge +full"]) == [
      ("SMAT", "PMF"), ("SMAT +full", "SoftMerge +full"), ("SMAT +full", "SMAT")]
  # Sparse fine-tuning: each against full, then SMAT's learned mask against each strategy.
  assert tables.strategy_pairs(["Pre +full", "Pre +MAP", "SMAT +full", "SMAT +sparse",
                                "SMAT +circuit", "SMAT"]) == [
      ("Pre +MAP", "Pre +full"), ("SMAT +sparse", "SMAT +full"),
      ("SMAT +circuit", "SMAT +full"), ("SMAT +sparse", "SMAT +circuit")]
  # A zero-shot cell with more episodes is compared on the fine-tuned cell's episodes only.
  cells["SMAT +full"] = {"a": {"per_episode": [90.0, 60.0]}}
  assert tables.paired(cells, "SMAT +full", "SMAT", ["a"])["a"][0] == 5.0


def test_strategies_benchmark_trains_each_strategy_once_and_resumes(monkeypatch, tmp_path):
  """experiments/strategies.py with training and evaluation replaced by recorders: every
  strategy is meta-trained at τ with its masks, Self-Pruner gets the searched rates, finished
  cells are reused, and the table pairs learned against every strategy."""
  import json
  import types

  from experiments import strategies

  trained, searched = [], []
  monkeypatch.setattr(strategies.sweep, "train_point",
                      lambda config, overrides, workdir, tau, experts: trained.append(
                          (workdir, tau, overrides)))
  monkeypatch.setattr(strategies, "search_rates", lambda *args: searched.append(args) or {
      "rates": [0.2, 0.05], "fitness": 1.0, "history": [1.0], "evaluations": 2})
  monkeypatch.setattr(strategies.metatrain, "load_run", lambda workdir: types.SimpleNamespace(
      workdir=workdir, theta_pre=None))
  monkeypatch.setattr(strategies.config_lib, "from_json", lambda path: types.SimpleNamespace(
      data=types.SimpleNamespace(image_size=8)))
  monkeypatch.setattr(strategies.sweep.spec_lib, "load_domains", lambda spec, seed: [spec])
  score = {"learned": 80.0, "random": 70.0, "selfpruner": 75.0}

  def evaluate_model(run, groups, protocol):
    acc = score[run.workdir.rsplit("/", 1)[1].split("_")[0]]
    return {s: {"accuracy": acc, "ci95": 1.0, "per_episode": [acc] * protocol.episodes}
            for s in groups}

  monkeypatch.setattr(strategies.evaluate, "evaluate", evaluate_model)
  monkeypatch.setattr(strategies.plots, "meta_test_density", lambda run: {})
  monkeypatch.setattr(strategies.plots, "density_summary", lambda density, theta: {
      "by_type": {"fc1": 0.1}})
  out = str(tmp_path / "out")
  args = ["--taus", "0.9", "--strategies", "learned,random,selfpruner", "--episodes", "3",
          "--id", "a", "--ood", "b", "--workdir", str(tmp_path / "runs"), "--out", out]
  assert strategies.main(args) == 0
  assert [(w.rsplit("/", 1)[1], tau) for w, tau, _ in trained] == [
      ("learned_tau0.9", 0.9), ("random_tau0.9", 0.9), ("selfpruner_tau0.9", 0.9)]
  assert trained[1][2][-1] == "--config.experts.masks=random"
  assert trained[2][2][-2:] == ["--config.experts.masks=selfpruner",
                                "--config.sparsity.rates=0.200000,0.050000"]
  assert len(searched) == 1
  text = open(out + ".md").read()
  assert "| domain | SMAT (learned) τ=0.9 − random τ=0.9 | SMAT (learned) τ=0.9 − Self-Pruner " \
         "τ=0.9 |" in text
  assert "| **OOD average** | +10.00 ± 0.00 | +5.00 ± 0.00 |" in text
  assert (tmp_path / "out_density.png").stat().st_size > 0
  assert strategies.main(args) == 0 and len(trained) == 3 and len(searched) == 1  # resumed
  assert json.load(open(out + ".json"))["density"]["random τ=0.9"] == {"fc1": 0.1}


def test_every_adapter_has_a_column_label():
  from smat import finetune

  assert set(tables.MODE_LABELS) == {"zero-shot", *finetune.ADAPTERS}
  assert set(tables.STRATEGY_MODES) < set(finetune.ADAPTERS)
