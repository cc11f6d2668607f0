"""benchmarks/tables.py: the paper-layout table from finished cells (averages, missing cells)."""

from benchmarks import tables


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
  # A zero-shot cell with more episodes is compared on the fine-tuned cell's episodes only.
  cells["SMAT +full"] = {"a": {"per_episode": [90.0, 60.0]}}
  assert tables.paired(cells, "SMAT +full", "SMAT", ["a"])["a"][0] == 5.0
