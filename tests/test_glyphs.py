"""The offline glyphs benchmark: script detection, rendering, deterministic build, domains."""

import hashlib
import json

import numpy as np
import pytest

from smat.data import domain
from smat.data.sources import glyphs
from smat.errors import DataError

def _digest(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("char, script", [
    ("A", "LATIN"), ("ж", "CYRILLIC"), ("Ա", "ARMENIAN"), ("ა", "GEORGIAN"), ("ת", "HEBREW"),
    ("ጀ", "ETHIOPIC"), ("ก", "THAI"), ("é", None), ("1", None), ("ʰ", None), ("𝐀", None)])
def test_script_of(char, script):
  assert glyphs.script_of(char) == script


def test_render_instance_is_seeded_and_jittered():
  font = str(glyphs.font_files()[0].parent / "NotoSans-Regular.ttf")
  config = glyphs.GlyphsConfig(size=24)
  ink = glyphs.ink_of("A", font, 4 * config.size)
  a = glyphs.render_instance(ink, (0, 65, 0), config)
  b = glyphs.render_instance(ink, (0, 65, 0), config)
  c = glyphs.render_instance(ink, (0, 65, 1), config)
  assert a.shape == (24, 24) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c.astype(int)).sum() > 0
  assert 0.02 < (a > 127).mean() < 0.6  # a letter, not a blank or a blot


def test_build_is_byte_identical_across_runs_and_worker_counts(tmp_path, glyphs_data_dir):
  _, first, config = glyphs_data_dir
  second = glyphs.build(tmp_path, config, workers=2, progress=False)
  assert first.name == second.name
  for name in ("images.npy", "metadata.json"):
    assert _digest(first / name) == _digest(second / name)


def test_build_contents_and_metadata(glyphs_data_dir):
  _, build_dir, config = glyphs_data_dir
  meta = json.loads((build_dir / "metadata.json").read_text())
  images = np.load(build_dir / "images.npy")
  assert images.shape == (meta["num_images"], 16, 16)
  assert meta["images_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()
  assert meta["id_scripts"] == ["ARMENIAN", "GEORGIAN"] and meta["ood_scripts"] == ["HEBREW"]
  assert {c["count"] for c in meta["classes"]} == {6}
  assert len({c["codepoint"] for c in meta["classes"]}) == len(meta["classes"])
  files = {f["file"] for f in meta["fonts"]}
  assert "NotoSansArmenian-Regular.ttf" in files and all(f["version"] for f in meta["fonts"])
  # What the bytes depend on besides the config: font package, font files, renderer versions.
  assert meta["font_package"]["name"] == "fonts-noto-core" and meta["font_package"]["version"]
  assert set(meta["renderer"]) == {"pillow", "fonttools", "numpy", "freetype"}
  assert all(meta["renderer"].values())
  # Instances of a class differ from each other (fonts × jitter), classes differ from classes.
  first = images[:6].reshape(6, -1).astype(int)
  assert min(np.abs(first[i] - first[j]).sum() for i in range(6) for j in range(i)) > 0


def test_prepare_again_is_instant_and_reuses_the_build(glyphs_data_dir):
  data_dir, build_dir, config = glyphs_data_dir
  mtime = (build_dir / "images.npy").stat().st_mtime_ns
  assert glyphs.build(data_dir, config, workers=1, progress=False) == build_dir
  assert (build_dir / "images.npy").stat().st_mtime_ns == mtime


def test_domains_split_classes_and_hold_out_scripts(glyphs_data_dir):
  _, build_dir, _ = glyphs_data_dir
  id_domain = glyphs.load_domains(build_dir, "id")
  names = {s: {c.name for c in id_domain.classes(s)} for s in ("pool", "train", "val", "test")}
  # 30 letters per script: round(0.7·30) = 21 training letters, θ_pre's pool round(10.5) = 10
  # of them and meta-training's the other 11; round(0.15·30) = 4 val, 5 test.
  assert [len(names[s]) for s in ("pool", "train", "val", "test")] == [20, 22, 8, 10]
  assert sum(map(len, names.values())) == len(set().union(*names.values()))  # disjoint
  assert {c.group for c in id_domain.classes("train")} == {"ARMENIAN", "GEORGIAN"}
  assert {c.group for c in id_domain.classes("pool")} == {"ARMENIAN", "GEORGIAN"}
  ood = glyphs.load_domains(build_dir, "ood")
  assert not ood.classes("train") and len(ood.classes("test")) == 27
  # A single script's split is the same as its part of glyphs:id.
  armenian = glyphs.load_domains(build_dir, "armenian")
  assert {c.name for c in armenian.classes("test")} == {
      c.name for c in id_domain.classes("test") if c.group == "ARMENIAN"}
  image = id_domain.read(int(id_domain.classes("train")[0].image_ids[0]))
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert image.max() == 255 and image.min() < 128  # dark ink on white paper


def test_the_pool_is_cut_from_the_training_classes_and_leaves_val_and_test_alone():
  classes = [domain.ImageClass(name=str(i), image_ids=np.arange(1)) for i in range(40)]
  with_pool = domain.split_classes_by_fraction(classes, (0.7, 0.15, 0.15), seed=[0, 7])
  without = domain.split_classes_by_fraction(classes, (0.7, 0.15, 0.15), seed=[0, 7],
                                             pool_share=0.0)
  assert without["pool"] == () and len(without["train"]) == 28
  assert with_pool["pool"] + with_pool["train"] == without["train"]
  assert len(with_pool["pool"]) == 14 == len(with_pool["train"])
  assert (with_pool["val"], with_pool["test"]) == (without["val"], without["test"])


def test_unknown_script_and_missing_build_and_missing_fonts(tmp_path, glyphs_data_dir):
  data_dir, build_dir, _ = glyphs_data_dir
  assert glyphs.find_build(data_dir) == build_dir  # the only build there
  with pytest.raises(DataError, match="no such script"):
    glyphs.load_domains(build_dir, "klingon")
  with pytest.raises(DataError, match="smat data prepare glyphs"):
    glyphs.find_build(tmp_path)
  with pytest.raises(DataError, match="apt-get install fonts-noto-core"):
    glyphs.build(tmp_path, font_dir=str(tmp_path / "no-fonts"))
