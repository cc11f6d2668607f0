"""The `smat` CLI contract: data prepare / describe / show, one-line errors, exit codes."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from smat import cli


def run(args, capsys):
  code = cli.main(args)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_describe_json_totals(glyphs_data_dir, capsys):
  data_dir, _, _ = glyphs_data_dir
  code, out, _ = run(["data", "describe", "glyphs:id,glyphs:ood", "--json", "--data-dir",
                      str(data_dir)], capsys)
  assert code == 0
  described = json.loads(out)
  assert described["num_classes"] == 87 and described["num_images"] == 87 * 6
  assert described["splits"]["test"]["num_classes"] == 10 + 27
  assert [d["name"] for d in described["domains"]] == ["glyphs:id", "glyphs:ood"]
  ipc = described["domains"][0]["splits"]["train"]["images_per_class"]
  assert ipc == {"min": 6, "median": 6.0, "max": 6}


def test_describe_text(glyphs_data_dir, capsys):
  data_dir, _, _ = glyphs_data_dir
  code, out, _ = run(["data", "describe", "glyphs:hebrew", "--data-dir", str(data_dir)], capsys)
  assert code == 0 and "glyphs:hebrew: 27 classes, 162 images" in out and "median 6" in out


def test_show_writes_the_episode_grid(glyphs_data_dir, tmp_path, capsys):
  data_dir, _, _ = glyphs_data_dir
  out_png = tmp_path / "episode.png"
  code, out, _ = run(["data", "show", "glyphs:ood", "--out", str(out_png), "--ways", "3",
                      "--shots", "2", "--queries", "4", "--image-size", "16",
                      "--data-dir", str(data_dir)], capsys)
  assert code == 0 and "3-way, 6 support, 12 query" in out
  image = np.asarray(Image.open(out_png))
  assert image.shape[0] == 6 * (64 + 2)  # 3 support rows + 3 query rows
  code2, _, _ = run(["data", "show", "glyphs:ood", "--out", str(tmp_path / "again.png"), "--ways",
                     "3", "--shots", "2", "--queries", "4", "--image-size", "16",
                     "--data-dir", str(data_dir)], capsys)
  assert code2 == 0 and (tmp_path / "again.png").read_bytes() == out_png.read_bytes()


def test_errors_are_one_line_with_exit_code_2(glyphs_data_dir, tmp_path, capsys):
  data_dir, _, _ = glyphs_data_dir
  cases = [
      (["data", "describe", "nonsense:thing"], "unknown data SPEC"),
      (["data", "describe", f"folder:{tmp_path / 'missing'}"], "directory does not exist"),
      (["data", "show", "glyphs:hebrew", "--out", str(tmp_path / "x.png"), "--ways", "40",
        "--data-dir", str(data_dir)], "40-way episodes need ≥ 40 classes"),
      (["data", "show", "glyphs:id", "--out", str(tmp_path / "x.png"), "--shots", "5",
        "--queries", "5", "--split", "test", "--data-dir", str(data_dir)], "needs 10"),
  ]
  for args, message in cases:
    code, _, err = run(args, capsys)
    assert code == 2, args
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_help_tells_the_story():
  out = subprocess.run([sys.executable, "-m", "smat.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  for word in ("reproduce", "data", "glyphs:id", "md_h5:<dir>:<source>", "folder:<path>"):
    assert word in out
