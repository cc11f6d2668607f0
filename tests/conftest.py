"""Shared fixtures, made once per session: a small glyphs build (two ID scripts, one held-out),
a tiny θ_pre directory, and the config overrides that run the two together."""

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


@pytest.fixture(scope="session")
def backbone(tmp_path_factory) -> str:
  """A tiny θ_pre directory: one 16-wide block on 16-px images (init key 0)."""
  import jax

  from smat.models import checkpoint, vit

  config = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
  path = tmp_path_factory.mktemp("backbone") / "tiny"
  checkpoint.save(str(path), vit.init(config, jax.random.key(0)), config)
  return str(path)


@pytest.fixture(scope="session")
def base(glyphs_data_dir, backbone) -> list[str]:
  """Overrides every run needs: the session's glyphs build, the tiny backbone, 16 px."""
  data_dir, _, _ = glyphs_data_dir
  return [f"--config.data_dir={data_dir}", f"--config.backbone.path={backbone}",
          "--config.data.image_size=16"]


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
