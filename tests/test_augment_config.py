"""On-device augmentation and Python config files with overrides."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import config
from smat.data import augment
from smat.errors import SmatError

ROOT = Path(__file__).resolve().parents[1]
NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0)
IDENTITY_CROP = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
run_augment = jax.jit(augment.augment, static_argnames="config")
run_crop = jax.jit(augment.random_resized_crop, static_argnums=(2, 3))
run_jitter = jax.jit(augment.color_jitter, static_argnums=(2, 3, 4))


def images(shape=(2, 3, 8, 8, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0.05, 0.95, shape), jnp.float32)


def test_augment_shape_dtype_range():
  x = images()
  out = run_augment(jax.random.key(0), x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  assert float(jnp.abs(out - x).max()) > 0.05


def test_augment_is_a_function_of_the_key():
  x = images()
  a = run_augment(jax.random.key(1), x)
  b = run_augment(jax.random.key(1), x)
  c = run_augment(jax.random.key(2), x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(a - c).max()) > 1e-2


def test_each_image_gets_its_own_randomness():
  x = jnp.broadcast_to(images((1, 8, 8, 3)), (4, 8, 8, 3))
  out = np.asarray(run_augment(jax.random.key(3), x))
  for i in range(1, 4):
    assert np.abs(out[0] - out[i]).max() > 1e-3


def test_flip_only_gives_the_mirror_image():
  x = images((3, 8, 8, 3), seed=1)
  cfg = augment.AugmentConfig(**IDENTITY_CROP, **NO_JITTER, flip_prob=1.0)
  out = run_augment(jax.random.key(4), x, config=cfg)
  np.testing.assert_allclose(out, np.asarray(x)[:, :, ::-1], atol=1e-5)
  assert np.abs(np.asarray(x)[:, :, ::-1] - np.asarray(x)).max() > 0.1


def test_identity_crop_returns_the_input():
  x = images((3, 8, 8, 3), seed=2)
  for k in range(3):
    out = run_crop(jax.random.key(k), x[k], (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(out, x[k], atol=1e-4)
  cfg = augment.AugmentConfig(**IDENTITY_CROP, **NO_JITTER, flip_prob=0.0)
  np.testing.assert_allclose(run_augment(jax.random.key(5), x, config=cfg), x, atol=1e-4)


def test_smaller_crop_zooms_in():
  ramp = jnp.broadcast_to(jnp.linspace(0.0, 1.0, 16)[None, :, None], (16, 16, 3))
  out = np.asarray(run_crop(jax.random.key(6), ramp, (0.25, 0.25), (1.0, 1.0)))
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape), atol=1e-4)
  span = out[0, -1, 0] - out[0, 0, 0]
  assert 0.4 < span < 0.55
  assert np.all(np.diff(out[0, :, 0]) > 0)


def test_brightness_scales_every_pixel_by_one_factor():
  x = images((8, 8, 3), seed=3) * 0.5
  out = run_jitter(jax.random.key(7), x, 0.4, 0.0, 0.0)
  ratio = np.asarray(out) / np.asarray(x)
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
  assert 0.6 <= ratio.flat[0] <= 1.4 and abs(ratio.flat[0] - 1.0) > 1e-4


def test_saturation_leaves_gray_pixels_alone():
  gray = jnp.broadcast_to(images((8, 8, 1), seed=4), (8, 8, 3))
  out = run_jitter(jax.random.key(8), gray, 0.0, 0.0, 0.4)
  np.testing.assert_allclose(out, gray, atol=1e-5)
  colour = images((8, 8, 3), seed=5)
  assert float(jnp.abs(run_jitter(jax.random.key(8), colour, 0.0, 0.0, 0.4)
                       - colour).max()) > 1e-3


def test_to_float_and_normalize():
  raw = jnp.array([[[0, 128, 255]]], jnp.uint8)
  np.testing.assert_allclose(augment.to_float(raw), [[[0.0, 128 / 255, 1.0]]], atol=1e-7)
  x = np.random.default_rng(6).uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
  expected = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(augment.normalize(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(augment.normalize(jnp.asarray(x), mean=(0.5,) * 3, std=(0.25,) * 3),
                             (x - 0.5) * 4, rtol=1e-5, atol=1e-5)


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)


def test_config_overrides_keep_the_field_type(in_repo):
  base = config.load("configs/glyphs_small.py")
  assert base.data.image_size == 32 and base.data.sampler == "md"
  cfg = config.load("configs/glyphs_small.py",
                    ["--config.data.image_size=64", "config.data.sampler=fixed",
                     "--config.seed=7", "data.max_ways=12"])
  assert cfg.data.image_size == 64 and type(cfg.data.image_size) is int
  assert cfg.data.sampler == "fixed" and cfg.seed == 7 and cfg.data.max_ways == 12
  assert cfg.data.max_support == 500
  text = config.load("configs/glyphs_small.py", ["--config.data.train=123"])
  assert text.data.train == "123"


def test_config_smoke_variant_differs(in_repo):
  base = config.load("configs/glyphs_small.py")
  smoke = config.load("configs/glyphs_small.py:smoke")
  assert (base.data.max_ways, base.data.max_support, base.data.meta_batch_size) == (50, 500, 4)
  assert (smoke.data.max_ways, smoke.data.max_support, smoke.data.meta_batch_size) == (10, 50, 2)
  assert smoke.data.image_size == base.data.image_size
  both = config.load("configs/glyphs_small.py:smoke", ["--config.data.max_ways=20"])
  assert both.data.max_ways == 20 and both.data.max_support == 50


def test_config_errors(in_repo):
  with pytest.raises(SmatError, match="data.imag_size"):
    config.load("configs/glyphs_small.py", ["--config.data.imag_size=64"])
  with pytest.raises(SmatError, match="dat.image_size"):
    config.load("configs/glyphs_small.py", ["--config.dat.image_size=64"])
  with pytest.raises(SmatError, match="data.image_size=big"):
    config.load("configs/glyphs_small.py", ["--config.data.image_size=big"])
  with pytest.raises(SmatError, match="expected --config.FIELD=VALUE"):
    config.load("configs/glyphs_small.py", ["--config.data.image_size"])
  with pytest.raises(SmatError, match="configs/nope.py: file not found"):
    config.load("configs/nope.py")


def test_config_without_get_config(tmp_path):
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(SmatError, match="defines no get_config"):
    config.load(str(empty))


def test_a_run_saved_before_a_field_existed_loads_with_its_default(in_repo, tmp_path):
  import json

  saved = config.load("configs/smat_glyphs.py", ["--config.experts.num_experts=3"]).to_dict()
  del saved["sparsity"], saved["experts"]["masks"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  loaded = config.from_json(str(path))
  assert loaded.experts.masks == "learned" and loaded.sparsity.window == 10
  assert loaded.experts.num_experts == 3  # saved values win
  with pytest.raises(AttributeError):
    loaded.experts.no_such_field  # still locked
