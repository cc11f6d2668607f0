"""The ViT backbone: parameter counts, timm/HF import against reference outputs, position-embedding
interpolation, weight-file errors, numerics switches, checkpoints, `smat embed`, and the layout's
names and pure pieces against the Flax module."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from smat import cli, embed
from smat.errors import DataError, SmatError
from smat.models import checkpoint, convert, layout, vit

FIXTURES = Path(__file__).parent / "fixtures" / "vit"
EPS = {"timm": 1e-6, "hf": 1e-12}
_forward = jax.jit(vit.forward, static_argnums=2)


def fixture_config(fmt: str = "timm", **overrides) -> vit.ViTConfig:
  """The architecture of `tests/fixtures/make_vit_fixture.py`."""
  return vit.ViTConfig(patch_size=8, width=48, depth=2, num_heads=3, mlp_dim=192, image_size=32,
                       layer_norm_eps=EPS[fmt], **overrides)


def features(params, images, config):
  return np.asarray(_forward(params, vit.preprocess(jnp.asarray(images), config), config))


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_max_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(max_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def timm():
  """(params, config, reference arrays) of the imported timm fixture."""
  config = fixture_config("timm")
  params = convert.import_safetensors(str(FIXTURES / "timm.safetensors"), "timm", config)
  return params, config, dict(np.load(FIXTURES / "timm.npz"))


@pytest.fixture(scope="module")
def timm_tensors():
  from safetensors.numpy import load_file

  return load_file(str(FIXTURES / "timm.safetensors"))


@pytest.fixture(scope="module")
def saved_backbone(timm, tmp_path_factory):
  params, config, _ = timm
  directory = tmp_path_factory.mktemp("ckpt") / "bb"
  checkpoint.save(str(directory), params, config, source="timm.safetensors", format="timm")
  return directory


# 1. Parameter counts and shapes (no weights are allocated).

@pytest.mark.parametrize("arch, count", [("vit_s16", 21_665_664), ("vit_b16", 85_798_656)])
def test_param_counts_match_timm_dino(arch, count):
  assert vit.count_params(vit.param_shapes(vit.get_config(arch))) == count


def test_param_shapes_vit_s16():
  shapes = vit.param_shapes(vit.get_config("vit_s16"))
  assert shapes["blocks"]["attn"]["query"]["kernel"].shape == (12, 384, 384)
  assert shapes["blocks"]["attn"]["proj"]["bias"].shape == (12, 384)
  assert shapes["blocks"]["fc1"]["kernel"].shape == (12, 384, 1536)
  assert shapes["blocks"]["norm1"]["scale"].shape == (12, 384)
  assert shapes["pos_embed"].shape == (1, 197, 384)
  assert shapes["cls_token"].shape == (1, 1, 384)
  assert shapes["patch_embed"]["kernel"].shape == (16, 16, 3, 384)
  assert shapes["norm"]["scale"].shape == (384,)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))


# 2. Import equality with the reference implementations.

@pytest.mark.parametrize("size", [32, 24, 40])
def test_timm_import_matches_reference(timm, size):
  params, config, ref = timm
  out = features(params, ref[f"images_{size}"], config)
  assert out.shape == (4, 48) and out.dtype == np.float32
  assert max_diff(out, ref[f"features_{size}"]) <= 1e-4


def test_hf_import_matches_reference():
  config = fixture_config("hf")
  path = str(FIXTURES / "hf.safetensors")
  params = convert.import_safetensors(path, "hf", config)  # its pooler is skipped
  ref = np.load(FIXTURES / "hf.npz")
  assert max_diff(features(params, ref["images_32"], config), ref["features_32"]) <= 1e-4
  # ViTForImageClassification-style files prefix the backbone with `vit.`.
  prefixed = {"vit." + k: v for k, v in convert.read_safetensors(path).items()}
  assert tree_max_diff(convert.convert(prefixed, "hf", config), params) == 0


@pytest.mark.parametrize("size", [32, 24])
def test_dinov2_import_matches_reference(size):
  """LayerScale blocks (DINOv2) in timm's layout: the same features as timm's model, DINOv2's
  unused mask_token skipped, and the LayerScale gammas really used."""
  config = fixture_config("timm", layer_scale=True)
  path = str(FIXTURES / "dinov2.safetensors")
  params = convert.import_safetensors(path, "timm", config)
  assert params["blocks"]["ls1"]["gamma"].shape == (2, 48)
  ref = np.load(FIXTURES / "dinov2.npz")
  out = features(params, ref[f"images_{size}"], config)
  assert max_diff(out, ref[f"features_{size}"]) <= 1e-4
  unscaled = jax.tree.map(lambda x: x, params)
  unscaled["blocks"]["ls1"]["gamma"] = jnp.ones_like(params["blocks"]["ls1"]["gamma"])
  assert max_diff(features(unscaled, ref[f"images_{size}"], config), out) > 1e-3
  exported = convert.export(params, "timm")
  tensors = convert.read_safetensors(path)
  assert sorted(exported) == sorted(k for k in tensors if k != "mask_token")
  with pytest.raises(convert.WeightsError, match="use --format timm"):
    convert.convert(tensors, "hf", config)
  # A DINO (v1) architecture asked to read DINOv2 weights names the LayerScale keys.
  with pytest.raises(convert.WeightsError, match="unexpected keys .*ls1.gamma"):
    convert.convert(tensors, "timm", fixture_config("timm"))


@pytest.mark.parametrize("size", [32, 24])
def test_dinov2_with_registers_matches_reference(size):
  """timm's reg4 DINOv2 layout: 4 register tokens after CLS, position embeddings for the patches
  only (resampled without a CLS row at 24 px); the registers really take part."""
  config = fixture_config("timm", layer_scale=True, registers=4)
  path = str(FIXTURES / "dinov2_reg.safetensors")
  params = convert.import_safetensors(path, "timm", config)
  assert params["reg_token"].shape == (1, 4, 48) and params["pos_embed"].shape == (1, 16, 48)
  ref = np.load(FIXTURES / "dinov2_reg.npz")
  out = features(params, ref[f"images_{size}"], config)
  assert max_diff(out, ref[f"features_{size}"]) <= 1e-4
  noise = jax.random.normal(jax.random.key(0), params["reg_token"].shape)
  moved = {**params, "reg_token": params["reg_token"] + noise}  # a constant shift would be
  # cancelled by LayerNorm
  assert max_diff(features(moved, ref[f"images_{size}"], config), out) > 1e-3
  # Read as DINOv2 without registers, the file's reg_token and pos_embed are named.
  with pytest.raises(convert.WeightsError, match=r"unexpected keys .*reg_token.*\n.*pos_embed"):
    convert.import_safetensors(path, "timm", fixture_config("timm", layer_scale=True))
  with pytest.raises(SmatError, match="registers"):
    vit.require_plain_blocks(config, "circuit")


def test_dinov2_presets_have_timms_parameter_counts():
  # timm's vit_small_patch14_dinov2 / vit_base_patch14_dinov2 (num_classes=0): 22,056,192 and
  # 86,579,712 parameters (their 518-px position embeddings included); with 4 registers
  # (vit_*_patch14_reg4_dinov2): 22,057,344 and 86,582,016.
  for arch, count in (("vit_s14_dinov2", 22_056_192), ("vit_b14_dinov2", 86_579_712),
                      ("vit_s14_dinov2_reg4", 22_057_344), ("vit_b14_dinov2_reg4", 86_582_016)):
    shapes = vit.param_shapes(vit.get_config(arch))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count, arch


# 3. Backbone directories.

def test_checkpoint_round_trip_is_bit_identical(timm, saved_backbone):
  params, config, _ = timm
  loaded, loaded_config = checkpoint.load(str(saved_backbone))
  assert loaded_config == config
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    a = np.asarray(a)
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
  meta = json.loads((saved_backbone / "backbone.json").read_text())
  assert meta["source"] == "timm.safetensors" and meta["format"] == "timm"
  _, bf16_config = checkpoint.load(str(saved_backbone), dtype="bfloat16")
  assert bf16_config == config.replace(dtype="bfloat16")


# The block's pieces written for XLA:CPU's speed compute what their textbook forms compute.

def test_gelu_is_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 4001)
  ours, reference = layout.gelu(x), jax.nn.gelu(x, approximate=False)
  # Where erf(x/√2) rounds to −1 (x < −4) the erf form is 0 and the erfc form ~1e-7: the
  # absolute difference is float32's rounding of 1 + erf, as in PyTorch's GELU.
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  # Φ(1) = 0.8413447460685429 (the standard normal CDF): GELU(1) = Φ(1), GELU(−1) = Φ(1) − 1.
  np.testing.assert_allclose(layout.gelu(jnp.array([1.0, -1.0])),
                             [0.8413447460685429, 0.8413447460685429 - 1], rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda t: layout.gelu(t).sum())(x),
                             jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(x),
                             rtol=1e-5, atol=1e-6)


def test_softmax_and_its_gradient_match_jax():
  scores = 4 * jax.random.normal(jax.random.key(0), (2, 3, 7, 7))
  cotangent = jax.random.normal(jax.random.key(1), scores.shape)
  np.testing.assert_allclose(layout.softmax(scores), jax.nn.softmax(scores, axis=-1),
                             rtol=1e-6, atol=1e-7)
  loss = lambda f: lambda s: jnp.sum(f(s) * cotangent)
  np.testing.assert_allclose(jax.grad(loss(layout.softmax))(scores),
                             jax.grad(loss(lambda s: jax.nn.softmax(s, axis=-1)))(scores),
                             rtol=1e-5, atol=1e-6)
  # Second order too (the outer gradient of a step that differentiates through the backbone).
  second = lambda f: jax.grad(lambda s: jnp.sum(jax.grad(loss(f))(s) ** 2))(scores)
  np.testing.assert_allclose(second(layout.softmax),
                             second(lambda s: jax.nn.softmax(s, axis=-1)), rtol=1e-4, atol=1e-5)


def test_attention_matches_its_textbook_form():
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 9, 4, 8))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  reference = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
  np.testing.assert_allclose(layout.attend(q, k, v), reference, rtol=1e-5, atol=1e-6)


# 4. Position-embedding interpolation.

def test_resample_pos_embed_is_identity_at_native_grid():
  pos = jax.random.normal(jax.random.key(0), (1, 197, 384))
  out = vit.resample_pos_embed(pos, 14, 14)
  assert out.shape == pos.shape and np.array_equal(np.asarray(out), np.asarray(pos))


def test_resample_pos_embed_other_grid_keeps_cls_and_constants():
  pos = jnp.concatenate([jnp.full((1, 1, 8), 5.0), jnp.full((1, 196, 8), 2.0)], axis=1)
  out = np.asarray(vit.resample_pos_embed(pos, 3, 5))
  assert out.shape == (1, 1 + 15, 8)
  assert np.all(out[0, 0] == 5.0)
  np.testing.assert_allclose(out[0, 1:], 2.0, atol=1e-5)


def test_cubic_resize_matrix_identity_at_scale_one():
  for n in (1, 2, 5, 14):
    np.testing.assert_array_equal(vit.cubic_resize_matrix(n, n, 1.0), np.eye(n, dtype=np.float32))


@pytest.mark.parametrize("n_in, n_out", [(14, 8), (14, 20), (4, 7)])
def test_cubic_resize_matrix_rows_sum_to_one(n_in, n_out):
  weights = vit.cubic_resize_matrix(n_in, n_out, (n_out + 0.1) / n_in)
  assert weights.shape == (n_out, n_in)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("n_in, n_out, scale", [(14, 8, 8 / 14), (14, 20, 20 / 14),
                                                 (14, 8, 8.1 / 14), (10, 31, 31 / 10)])
def test_cubic_resize_of_a_linear_ramp_in_the_interior(n_in, n_out, scale):
  """Ramp 0..n-1 → source coordinate s plus Keys' first-moment error −(2a+1)·t(1−t)(1−2t).

  With PyTorch's a = −0.75 that is ½·t(1−t)(1−2t), t = s − ⌊s⌋ (only a = −0.5 reproduces
  linear functions exactly), e.g. 2.125 → 2.125 + ½·⅛·⅞·¾ = 2.166015625.
  """
  weights = vit.cubic_resize_matrix(n_in, n_out, scale)
  resized = weights.astype(np.float64) @ np.arange(n_in)
  source = (np.arange(n_out) + 0.5) / scale - 0.5
  t = source - np.floor(source)
  interior = (np.floor(source) - 1 >= 0) & (np.floor(source) + 2 <= n_in - 1)
  assert interior.sum() >= n_out // 2
  expected = source + 0.5 * t * (1 - t) * (1 - 2 * t)
  np.testing.assert_allclose(resized[interior], expected[interior], atol=1e-5)


def test_cubic_resize_clamps_taps_at_the_border():
  """Row 0 of 14 → 20: source −0.15, taps at −2, −1, 0, 1; the first three clamp to pixel 0.

  Pixel 1 gets the far lobe at distance 1.15: ((a·1.15 − 5a)·1.15 + 8a)·1.15 − 4a = −0.08128125.
  """
  row = vit.cubic_resize_matrix(14, 20, 20 / 14)[0]
  np.testing.assert_allclose(row[:2], [1.08128125, -0.08128125], atol=1e-6)
  assert np.all(row[2:] == 0)


def test_cubic_resize_halving_reproduces_a_ramp_exactly():
  """Scale ½ samples half-way between source pixels (t = ½), where the kernel is symmetric."""
  resized = vit.cubic_resize_matrix(16, 8, 0.5) @ np.arange(16, dtype=np.float32)
  np.testing.assert_allclose(resized[1:-1], 2 * np.arange(1, 7) + 0.5, atol=1e-5)


# 5. Weight files that do not fit.

def test_timm_file_read_as_hf_lists_missing_and_unexpected_keys():
  with pytest.raises(convert.WeightsError) as info:
    convert.import_safetensors(str(FIXTURES / "timm.safetensors"), "hf", fixture_config("hf"))
  message = str(info.value)
  assert "missing keys" in message and "embeddings.position_embeddings" in message
  assert "unexpected keys" in message and "blocks.0.attn.qkv.weight" in message
  assert "mis-shaped" not in message


def test_one_error_names_missing_unexpected_and_misshaped_keys(timm_tensors, tmp_path):
  from safetensors.numpy import save_file

  tensors = dict(timm_tensors)
  del tensors["norm.bias"]
  tensors["extra.weight"] = np.zeros((3,), np.float32)
  tensors["pos_embed"] = np.zeros((1, 10, 48), np.float32)
  bad = tmp_path / "bad.safetensors"
  save_file(tensors, str(bad))
  with pytest.raises(convert.WeightsError) as info:
    convert.import_safetensors(str(bad), "timm", fixture_config())
  message = str(info.value)
  assert str(bad) in message
  assert "missing keys (1): norm.bias" in message
  assert "unexpected keys (1): extra.weight" in message
  assert "mis-shaped keys (1)" in message and "pos_embed" in message
  assert "(1, 10, 48)" in message and "(1, 17, 48)" in message


def test_misshaped_stacked_key_in_every_layer(timm_tensors):
  tensors = dict(timm_tensors)
  for i in range(2):
    tensors[f"blocks.{i}.mlp.fc1.weight"] = np.zeros((191, 48), np.float32)
  with pytest.raises(convert.WeightsError) as info:
    convert.convert(tensors, "timm", fixture_config())
  message = str(info.value)
  assert "mis-shaped keys (2)" in message
  for i in range(2):
    assert f"blocks.{i}.mlp.fc1.weight (191, 48) → blocks/fc1/kernel (48, 191), expected (48, 192)" in message
  assert "missing" not in message and "unexpected" not in message


def test_missing_key_in_one_layer_is_only_missing(timm_tensors):
  tensors = dict(timm_tensors)
  del tensors["blocks.1.norm1.weight"]
  with pytest.raises(convert.WeightsError) as info:
    convert.convert(tensors, "timm", fixture_config())
  message = str(info.value)
  assert "missing keys (1): blocks.1.norm1.weight" in message
  assert "unexpected" not in message


def test_misshaped_key_in_one_layer_is_a_weights_error(timm_tensors):
  tensors = dict(timm_tensors)
  tensors["blocks.0.attn.qkv.weight"] = np.zeros((147, 48), np.float32)
  with pytest.raises(convert.WeightsError, match="blocks.0.attn.qkv.weight"):
    convert.convert(tensors, "timm", fixture_config())


def test_unreadable_weight_files(tmp_path):
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(convert.WeightsError, match="not a readable safetensors file"):
    convert.import_safetensors(str(junk), "timm", fixture_config())
  with pytest.raises(convert.WeightsError, match="no such file"):
    convert.import_safetensors(str(tmp_path / "absent.safetensors"), "timm", fixture_config())
  with pytest.raises(convert.WeightsError, match="unknown weight format"):
    convert.convert({}, "torch", fixture_config())


def test_cli_import_backbone_bad_weights(timm_tensors, tmp_path, capsys):
  from safetensors.numpy import save_file

  tensors = dict(timm_tensors)
  del tensors["cls_token"]
  bad = tmp_path / "bad.safetensors"
  save_file(tensors, str(bad))
  out = tmp_path / "o"
  code = cli.main(["import-backbone", "--format", "timm", "--weights", str(bad), "--arch",
                   "vit_s16", "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("error: ") and "missing keys" in err and "cls_token" in err
  assert not out.exists() and not Path(str(out) + ".tmp").exists()


def test_safetensors_backbone_needs_format_and_arch():
  with pytest.raises(SmatError, match="--format"):
    checkpoint.load("x.safetensors")
  with pytest.raises(SmatError, match="--arch"):
    checkpoint.load("x.safetensors", "timm")
  with pytest.raises(SmatError, match="unknown backbone arch"):
    checkpoint.load(str(FIXTURES / "timm.safetensors"), "timm", "vit_huge")
  with pytest.raises(SmatError, match="not a backbone directory"):
    checkpoint.load(str(FIXTURES))


# 6. Numerics switches.

def test_bfloat16_is_close_to_float32_and_returns_float32(timm):
  params, config, ref = timm
  out32 = features(params, ref["images_32"], config)
  out16 = features(params, ref["images_32"], config.replace(dtype="bfloat16"))
  assert out16.dtype == np.float32
  assert 0 < max_diff(out16, out32) < 0.1  # features are ~3 in scale; bf16 is not a no-op


def test_remat_and_rolled_loop_match(timm):
  params, config, ref = timm
  x = vit.preprocess(jnp.asarray(ref["images_32"]), config)
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: jnp.sum(vit.forward(p, x, c) ** 2)))
  value, grad = loss(config)(params)
  value_remat, grad_remat = loss(config.replace(remat=True))(params)
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  assert tree_max_diff(grad_remat, grad) <= 1e-5
  base = features(params, ref["images_32"], config)
  np.testing.assert_allclose(features(params, ref["images_32"], config.replace(remat=True)), base,
                             atol=1e-6)
  rolled = config.replace(unroll_blocks=False)
  np.testing.assert_allclose(features(params, ref["images_32"], rolled), base, atol=1e-5)


def test_config_validation():
  with pytest.raises(ValueError, match="divisible"):
    fixture_config().replace(num_heads=5)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    fixture_config().replace(image_size=36)
  with pytest.raises(ValueError, match="dtype"):
    fixture_config().replace(dtype="float16")
  with pytest.raises(ValueError, match="unknown backbone arch"):
    vit.get_config("vit_l16")


# 7. Gradients through the interpolated position embeddings.

def test_pos_embed_gradient_through_interpolation_matches_finite_differences(timm):
  """float32 central differences (the model computes in float32 even under x64)."""
  params, config, ref = timm
  x = vit.preprocess(jnp.asarray(ref["images_24"]), config)  # a 3×3 grid from the 4×4 one
  loss = jax.jit(lambda pos: jnp.sum(vit.forward({**params, "pos_embed": pos}, x, config) ** 2))
  pos = jnp.asarray(params["pos_embed"])
  grad = jax.grad(loss)(pos)
  assert float(jnp.abs(grad[0, 1:]).max()) > 1e-2  # patch rows get gradient through the resize
  unit = lambda v: v / jnp.linalg.norm(v)
  patch_grad = unit(grad.at[0, 0].set(0.0))
  for seed in range(2):  # patch rows only (the resized part), half along the gradient so the
    noise = unit(jax.random.normal(jax.random.key(seed), pos.shape).at[0, 0].set(0.0))
    direction = unit(patch_grad + noise)  # derivative stands well above float32 noise
    eps = 1e-2
    numeric = (loss(pos + eps * direction) - loss(pos - eps * direction)) / (2 * eps)
    analytic = jnp.vdot(grad, direction)
    assert abs(float(numeric - analytic)) <= 2e-2 * abs(float(analytic)), (numeric, analytic)


# 8. `smat embed`.

def test_cli_embed_matches_reference_features(timm, saved_backbone, tmp_path, capsys):
  _, _, ref = timm
  names = ["b/x.png", "a/z.png", "a/deeper/y.png", "b/w.png"]  # fixture image i → names[i]
  root = tmp_path / "imgs"
  for name, image in zip(names, ref["images_32"]):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / name)
  (root / "a" / "notes.txt").write_text("not an image")
  out = tmp_path / "out.npz"
  code = cli.main(["embed", "--backbone", str(saved_backbone), "--images", str(root), "--out",
                   str(out)])
  assert code == 0, capsys.readouterr().err
  result = np.load(out)
  expected_paths = sorted(os.path.join(*n.split("/")) for n in names)
  assert list(result["paths"]) == expected_paths
  order = [names.index(p.replace(os.sep, "/")) for p in expected_paths]
  assert result["features"].shape == (4, 48) and result["features"].dtype == np.float32
  assert max_diff(result["features"], ref["features_32"][order]) <= 1e-4


def test_embed_folder_at_another_size_interpolates(timm, tmp_path):
  params, config, ref = timm
  for i, image in enumerate(ref["images_24"]):
    Image.fromarray(image).save(tmp_path / f"{i}.png")
  feats, paths = embed.embed_folder(params, config, str(tmp_path), image_size=24, batch_size=3,
                                    progress=False)
  assert paths == [f"{i}.png" for i in range(4)]
  assert max_diff(feats, ref["features_24"]) <= 1e-4


def test_load_image_resizes_and_centre_crops(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  image = embed.load_image(str(tmp_path / "a.png"), 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  wide = rng.integers(0, 256, (32, 96, 3), dtype=np.uint8)  # short side already 32: crop only
  Image.fromarray(wide).save(tmp_path / "wide.png")
  np.testing.assert_array_equal(embed.load_image(str(tmp_path / "wide.png"), 32), wide[:, 32:64])
  gray = np.full((20, 20), 77, np.uint8)  # grayscale, upsampled: constant stays constant, RGB
  Image.fromarray(gray).save(tmp_path / "gray.png")
  np.testing.assert_array_equal(embed.load_image(str(tmp_path / "gray.png"), 32),
                                np.full((32, 32, 3), 77, np.uint8))
  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(DataError, match="unreadable image"):
    embed.load_image(str(tmp_path / "broken.png"), 32)


def test_load_image_composites_transparency_at_any_size(tmp_path):
  for shape in [(32, 32), (40, 48)]:
    rgba = np.zeros(shape + (4,), np.uint8)
    rgba[..., :3] = 10  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    np.testing.assert_array_equal(embed.load_image(str(tmp_path / "t.png"), 32), 255)


def test_empty_image_folder_is_a_data_error(timm, tmp_path):
  params, config, _ = timm
  (tmp_path / "empty" / "sub").mkdir(parents=True)
  (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
  with pytest.raises(DataError, match="no image files"):
    embed.embed_folder(params, config, str(tmp_path / "empty"), progress=False)
  with pytest.raises(DataError, match="not a directory"):
    embed.image_paths(str(tmp_path / "missing"))


def test_configs_name_a_backbone_directory_or_safetensors_file(tmp_path):
  import ml_collections

  params = convert.import_safetensors(str(FIXTURES / "timm.safetensors"), "timm",
                                      fixture_config())
  checkpoint.save(str(tmp_path / "bb"), params, fixture_config())
  section = ml_collections.ConfigDict({"path": str(tmp_path / "bb"), "format": "",
                                       "arch": "", "dtype": "bfloat16", "remat": True})
  loaded, config = checkpoint.load_from_config(section)
  assert config.dtype == "bfloat16" and config.remat and config.width == 48
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A safetensors file straight from a config: the layout must match the architecture.
  section = ml_collections.ConfigDict({"path": str(FIXTURES / "timm.safetensors"),
                                       "format": "timm", "arch": "vit_s16"})
  with pytest.raises(convert.WeightsError, match="mis-shaped"):
    checkpoint.load_from_config(section)
  with pytest.raises(SmatError, match="backbone.path"):
    checkpoint.load_from_config(ml_collections.ConfigDict({"path": ""}))


@pytest.mark.parametrize("name, fmt, arch", [
    ("timm", "timm", {}), ("hf", "hf", {}), ("dinov2", "timm", {"layer_scale": True}),
    ("dinov2_reg", "timm", {"layer_scale": True, "registers": 4})])
def test_export_is_the_exact_inverse_of_import(name, fmt, arch):
  """Imported then exported, every tensor of the fixture comes back bit for bit under its own
  key and shape (timm's fused qkv, LayerScale and registers included); only the heads and
  tokens a backbone does not use are left."""
  from safetensors.numpy import load_file

  tensors = load_file(str(FIXTURES / f"{name}.safetensors"))
  params = convert.convert(dict(tensors), fmt, fixture_config(fmt, **arch))
  exported = convert.export(params, fmt)
  kept = {k: v for k, v in tensors.items() if not convert._IGNORED[fmt].match(k)}
  assert sorted(exported) == sorted(kept)
  for key, value in kept.items():
    assert exported[key].shape == value.shape and exported[key].dtype == np.float32, key
    np.testing.assert_array_equal(exported[key], value.astype(np.float32), err_msg=key)


def test_export_of_changed_weights_reimports_to_the_same_features(timm):
  """A model that is not the fixture (θ_pre moved by a random δ, as a meta-trained θ_task is)
  exports to a file whose import computes its features exactly."""
  params, config, ref = timm
  keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params))))
  moved = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
  again = convert.convert(convert.export(moved, "timm"), "timm", config)
  assert tree_max_diff(again, moved) == 0.0
  images = ref["images_32"]
  np.testing.assert_array_equal(features(again, images, config), features(moved, images, config))
  assert max_diff(features(moved, images, config), ref["features_32"]) > 1e-3  # really changed


# 9. The layout: names and kinds of the Flax tree, and the pure pieces against its forward.

@pytest.mark.parametrize("arch", [{}, {"layer_scale": True, "registers": 4}])
def test_layout_names_every_leaf_of_the_flax_tree(arch):
  config = fixture_config("timm", **arch)
  named = layout.named_leaves(vit.param_shapes(config))
  assert layout.depth(vit.param_shapes(config)) == config.depth
  kinds = set(layout.BLOCK_KINDS) | (set(layout.LAYER_SCALES) if config.layer_scale else set())
  assert {layout.kind(n) for n, _ in named if layout.is_block(n)} == kinds
  for name, leaf in named:
    assert layout.layer_count(name, leaf.shape) == (config.depth if layout.is_block(name) else 1)
    assert layout.is_block(name) == (layout.block_path(layout.in_block(name)) == name)
    if not layout.is_block(name):
      assert layout.kind(name) == (layout.FINAL_NORM_KIND if name.startswith("norm/")
                                   else layout.EMBEDDING_KIND), name
  assert layout.block_path(layout.ATTN, layout.PROJ, "kernel") in dict(named)
  assert (layout.REG_TOKEN in dict(named)) == bool(config.registers)


@pytest.mark.parametrize("size", [32, 24])
def test_pure_pieces_compute_the_flax_forward(timm, size):
  """embed → block per layer → features is `vit.forward` (resampled position embeddings at
  24 px); the per-node write hooks sum to the merged branch outputs."""
  params, config, ref = timm
  images = vit.preprocess(jnp.asarray(ref[f"images_{size}"]), config)
  eps, dh = config.layer_norm_eps, config.width // config.num_heads
  x = layout.embed(params, images)
  for l in range(config.depth):
    x = layout.block(x, layout.layer(params[layout.BLOCKS], l), eps, dh)
  flax_features = features(params, ref[f"images_{size}"], config)
  np.testing.assert_allclose(layout.features(x, params, eps), flax_features, atol=1e-5)
  p = layout.layer(params[layout.BLOCKS], 0)
  y = layout.layer_norm(x, p[layout.NORM1], eps)
  heads = layout.attention((y[None],) * 3, p[layout.ATTN], dh, layout.per_node)
  assert heads.shape == (config.num_heads, *x.shape)
  np.testing.assert_allclose(heads.sum(0) + p[layout.ATTN][layout.PROJ]["bias"],
                             layout.attention((y, y, y), p[layout.ATTN], dh), atol=1e-5)
  groups = layout.mlp(jnp.broadcast_to(y, (4, *y.shape)), p, config.mlp_dim // 4, layout.per_node)
  np.testing.assert_allclose(groups.sum(0) + p[layout.FC2]["bias"], layout.mlp(y, p), atol=1e-5)
