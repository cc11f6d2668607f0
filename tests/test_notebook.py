"""docs/api_tour.ipynb: committed without outputs, and every code cell runs top to bottom on a
tiny glyphs build and backbone (its parameters cell replaced), as a user would run it."""

import json
from pathlib import Path

import jax
import pytest

from smat.models import checkpoint, vit

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "api_tour.ipynb"

pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _cells():
  return json.loads(NOTEBOOK.read_text())["cells"]


def test_the_notebook_is_committed_without_outputs():
  code = [c for c in _cells() if c["cell_type"] == "code"]
  assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
  assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1


def test_the_notebook_runs_top_to_bottom(glyphs_data_dir, tmp_path, monkeypatch):
  data_dir, _, _ = glyphs_data_dir
  config = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
  backbone = tmp_path / "backbone"
  checkpoint.save(str(backbone), vit.init(config, jax.random.key(0)), config)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for cell in _cells():
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    if "parameters" in cell["metadata"].get("tags", []):
      source = (f"DATA_DIR = {str(data_dir)!r}\nBACKBONE = {str(backbone)!r}\n"
                f"WORKDIR = {str(tmp_path / 'tour')!r}\nIMAGE_SIZE = 16\nOVERRIDES = []\n")
    exec(compile(source, f"{NOTEBOOK.name} [{cell['id']}]", "exec"), namespace)
  assert (tmp_path / "tour" / "tour_mask_density.png").stat().st_size > 0
  assert namespace["alpha"].shape == (namespace["run"].hp.experts.num_experts,)
  for result in (namespace["zero_shot"], namespace["tuned"]):
    assert 0 <= result["glyphs:id"]["accuracy"] <= 100
