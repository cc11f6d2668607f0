"""Shared fixtures: a small glyphs build (two ID scripts, one held-out) made once per session."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

SMALL_GLYPHS = dict(size=16, instances=6, scripts=("ARMENIAN", "GEORGIAN", "HEBREW"),
                    max_classes_per_script=30)


@pytest.fixture(scope="session")
def glyphs_data_dir(tmp_path_factory):
  """A data dir holding a small glyphs build; returns (data_dir, build_dir, config)."""
  from smat.data.sources import glyphs

  data_dir = tmp_path_factory.mktemp("data")
  config = glyphs.GlyphsConfig(**SMALL_GLYPHS)
  build_dir = glyphs.build(data_dir, config, workers=1, progress=False)
  return data_dir, build_dir, config
