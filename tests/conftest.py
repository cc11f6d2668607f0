"""Shared fixtures: a small glyphs build (two ID scripts, one held-out) made once per session."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI turns a persistent XLA cache on in ~/.cache/smat; tests keep theirs per module
# (module_compilation_cache) and never write outside their temporary folders.
os.environ.setdefault("SMAT_COMPILE_CACHE", "off")

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


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
  """A persistent XLA cache for the requesting module only: identical steps compile once
  (`pytestmark = pytest.mark.usefixtures("module_compilation_cache")`)."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
