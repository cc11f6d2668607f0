"""DINO pre-training: its pieces against closed forms, one step's contract, a resumable run."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cheap_compile

from smat import config as config_lib
from smat import dino, pretrain
from smat.data.spec import load_domains
from smat.errors import SmatError
from smat.models import checkpoint, vit

pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _jit(fn, **kwargs):
  """jit with XLA's cheapest options: these tests are dominated by compile time."""
  return jax.jit(fn, compiler_options=cheap_compile.options(), **kwargs)


_multicrop = _jit(dino.multicrop, static_argnums=2)


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


# ----------------------------------------------------------------------------- centre, temperature


def test_center_update_is_an_ema_of_the_mean_over_views_and_batch():
  center = jnp.array([1.0, -2.0, 0.5])
  teacher = jnp.array([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]],  # [G=2, B=2, K=3]
                       [[0.0, 0.0, 4.0], [4.0, -4.0, 0.0]]])
  # mean of the 4 rows: [2, 0, 2]; 0.9 · center + 0.1 · [2, 0, 2]
  np.testing.assert_allclose(dino.update_center(center, teacher, 0.9), [1.1, -1.8, 0.65],
                             rtol=1e-6)
  np.testing.assert_allclose(dino.update_center(center, teacher, 0.0), [2.0, 0.0, 2.0])


def test_teacher_probabilities_are_centred_and_sharpened():
  logits, center = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 1.0, 0.0])
  # centred [1, 1, 3], / 0.5 → [2, 2, 6]: softmax = [1, 1, e⁴] / (2 + e⁴)
  expected = np.array([1.0, 1.0, math.exp(4)]) / (2 + math.exp(4))
  np.testing.assert_allclose(dino.teacher_probs(logits, center, 0.5), expected, rtol=1e-6)
  # A constant in the centre changes nothing; τ → 0 gives the one-hot argmax, τ → ∞ uniform.
  np.testing.assert_allclose(dino.teacher_probs(logits, center + 7.0, 0.5), expected, rtol=1e-5)
  np.testing.assert_array_equal(dino.teacher_probs(jnp.array([0.3, 0.9, 0.1]), 0.0, 1e-4),
                                [0.0, 1.0, 0.0])
  np.testing.assert_allclose(dino.teacher_probs(logits, center, 1e6), [1 / 3] * 3, rtol=1e-5)
  s = jnp.array([0.2, -0.1, 0.4])
  z = np.array([2.0, -1.0, 4.0])  # s / 0.1
  np.testing.assert_allclose(dino.student_log_probs(s, 0.1), z - np.log(np.exp(z).sum()),
                             rtol=1e-6)


# ----------------------------------------------------------------------------- multi-crop loss


@pytest.mark.parametrize("views", [5, 2])  # 2 global + 3 local crops; globals only
def test_multicrop_loss_equals_the_explicit_loop_over_view_pairs(views):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(views, 3, 7)).astype(np.float32)  # [V, B, K]
  teacher = rng.normal(size=(2, 3, 7)).astype(np.float32)  # [G, B, K]
  center = rng.normal(size=(7,)).astype(np.float32)
  total, pairs, with_same = 0.0, 0, 0.0
  for g in range(2):
    q = _np_softmax((teacher[g] - center) / 0.04)
    for v in range(views):
      log_p = np.log(_np_softmax(student[v] / 0.1))
      term = np.mean(np.sum(-q * log_p, axis=-1))
      with_same += term
      if v == g:  # the same crop: left out
        continue
      total += term
      pairs += 1
  assert pairs == 2 * views - 2 == dino.pair_mask(2, views).sum()
  assert not dino.pair_mask(2, views)[[0, 1], [0, 1]].any()
  loss = dino.multicrop_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center),
                             0.04, 0.1)
  np.testing.assert_allclose(loss, total / pairs, rtol=1e-5)
  assert abs(float(loss) - with_same / (2 * views)) > 1e-3  # the exclusion matters here


# ----------------------------------------------------------------------------- schedules, EMA


def test_momentum_schedule_is_the_cosine_from_0_996_to_1_and_ema_is_its_average():
  momentum = dino.Hyper(total_steps=100, momentum_teacher=0.996).momentum_at
  for step, expected in ((0, 0.996), (50, 0.998), (100, 1.0), (250, 1.0),
                         (25, 1 - 0.004 * (1 + math.cos(math.pi / 4)) / 2)):
    np.testing.assert_allclose(momentum(step), expected, rtol=0, atol=1e-7)
  teacher, student = {"a": jnp.array([1.0, 2.0])}, {"a": jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(dino.ema(teacher, student, 0.75)["a"], [1.5, 3.0])
  np.testing.assert_array_equal(dino.ema(teacher, student, 1.0)["a"], teacher["a"])


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
  lr = dino.cosine_schedule(1e-3, 1e-6, total_steps=110, warmup_steps=10)
  for step, expected in ((0, 0.0), (5, 5e-4), (10, 1e-3), (60, (1e-3 + 1e-6) / 2), (110, 1e-6),
                         (500, 1e-6)):
    np.testing.assert_allclose(lr(step), expected, rtol=1e-5, atol=1e-12)
  wd = dino.cosine_schedule(0.04, 0.4, total_steps=100)
  np.testing.assert_allclose([wd(0), wd(50), wd(100)], [0.04, 0.22, 0.4], rtol=1e-6)


def test_teacher_temperature_warms_up_linearly_then_stays():
  hyper = dino.Hyper(total_steps=100, warmup_teacher_temp=0.04, teacher_temp=0.07,
                     warmup_teacher_temp_steps=30)
  np.testing.assert_allclose([hyper.teacher_temp_at(s) for s in (0, 15, 30, 31, 1000)],
                             [0.04, 0.055, 0.07, 0.07, 0.07], rtol=1e-6)


# ----------------------------------------------------------------------------- head, clipping


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_is_mlp_then_l2_norm_then_weight_normalised_prototypes(norm_last_layer):
  config = dino.HeadConfig(hidden_dim=12, bottleneck_dim=6, out_dim=9,
                           norm_last_layer=norm_last_layer)
  params = dino.init_head(jax.random.key(0), 5, config)
  if not norm_last_layer:
    params["last_layer"]["g"] = jnp.full((9,), 2.5)
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, 5)))
  h = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()}
       for k, layer in params["mlp"].items()}
  y = _np_gelu(x @ h["dense_0"]["kernel"] + h["dense_0"]["bias"])
  y = _np_gelu(y @ h["dense_1"]["kernel"] + h["dense_1"]["bias"])
  y = y @ h["dense_2"]["kernel"] + h["dense_2"]["bias"]
  y = y / np.linalg.norm(y, axis=-1, keepdims=True)
  v = np.asarray(params["last_layer"]["kernel"], np.float64)
  w = v / np.linalg.norm(v, axis=0, keepdims=True) * (1.0 if norm_last_layer else 2.5)
  out = dino.head_apply(params, jnp.asarray(x))
  np.testing.assert_allclose(out, y @ w, rtol=1e-4, atol=1e-6)
  if norm_last_layer:  # cosines of unit vectors: scaling the direction changes nothing
    assert float(jnp.abs(out).max()) <= 1 + 1e-6
    scaled = {**params, "last_layer": {"kernel": 3.0 * params["last_layer"]["kernel"]}}
    np.testing.assert_allclose(dino.head_apply(scaled, jnp.asarray(x)), out, rtol=1e-5)
  assert ("g" in params["last_layer"]) == (not norm_last_layer)


def test_clipping_is_per_parameter_and_per_block():
  grads = {"backbone": {"blocks": {"w": jnp.array([[6.0, 8.0, 0.0], [0.6, 0.8, 0.0]])}},
           "head": {"a": jnp.array([0.0, 6.0]), "b": jnp.array([0.3, 0.4])}}
  clipped, _ = dino.clip_per_parameter(3.0).update(grads, optax.EmptyState())
  # block 0 has norm 10 → 3; block 1 (norm 1) and b (norm 0.5) are below 3 and stay.
  np.testing.assert_allclose(clipped["backbone"]["blocks"]["w"][0], [1.8, 2.4, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(clipped["backbone"]["blocks"]["w"][1],
                                grads["backbone"]["blocks"]["w"][1])
  np.testing.assert_allclose(clipped["head"]["a"], [0.0, 3.0], rtol=1e-5)
  np.testing.assert_array_equal(clipped["head"]["b"], grads["head"]["b"])


def test_freeze_zeroes_only_the_last_layer():
  tree = {"backbone": {"w": jnp.ones(2)}, "head": {"mlp": {"dense_0": {"kernel": jnp.ones(2)}},
                                                   "last_layer": {"kernel": jnp.ones(2)}}}
  frozen = dino.freeze_last_layer(tree, jnp.array(True))
  np.testing.assert_array_equal(frozen["head"]["last_layer"]["kernel"], [0, 0])
  np.testing.assert_array_equal(frozen["head"]["mlp"]["dense_0"]["kernel"], [1, 1])
  np.testing.assert_array_equal(frozen["backbone"]["w"], [1, 1])
  thawed = dino.freeze_last_layer(tree, jnp.array(False))
  np.testing.assert_array_equal(thawed["head"]["last_layer"]["kernel"], [1, 1])


def test_loss_gradient_wrt_the_student_head_matches_finite_differences():
  with jax.enable_x64(True):
    config = dino.HeadConfig(hidden_dim=10, bottleneck_dim=6, out_dim=8)
    # MLP kernels × 20: at DINO's N(0, 0.02) init the bottleneck is tiny and its L2
    # normalisation makes the loss so curved that central differences need ε < 1e-7.
    head = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(x, jnp.float64) * (
            20.0 if dino.is_last_layer(path) is False and path[-1].key == "kernel" else 1.0),
        dino.init_head(jax.random.key(2), 5, config))
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(4 * 3, 5)))  # V=4 views × B=3
    teacher = jnp.asarray(rng.normal(size=(2, 3, 8)))
    center = jnp.asarray(rng.normal(size=(8,)) * 0.1)

    @jax.jit
    def loss(h):
      logits = dino.head_apply(h, features).reshape(4, 3, 8)
      return dino.multicrop_loss(logits, teacher, center, 0.04, 0.1)

    grad = jax.grad(loss)(head)
    leaves, treedef = jax.tree.flatten(head)
    for i in range(len(leaves) + 2):  # one leaf at a time, then two directions through all
      keys = jax.random.split(jax.random.key(10 + i), len(leaves))
      direction = [jax.random.normal(k, x.shape, jnp.float64) * (i >= len(leaves) or j == i)
                   for j, (k, x) in enumerate(zip(keys, leaves))]
      d = jax.tree.unflatten(treedef, direction)
      eps = 1e-6
      plus = loss(jax.tree.map(lambda x, y: x + eps * y, head, d))
      minus = loss(jax.tree.map(lambda x, y: x - eps * y, head, d))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.vdot(g, y) for g, y in zip(jax.tree.leaves(grad), direction))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-9)
    # Weight normalisation: the loss ignores each prototype's length, so its gradient is
    # orthogonal to the prototype's direction.
    v, g_v = head["last_layer"]["kernel"], grad["last_layer"]["kernel"]
    np.testing.assert_allclose(jnp.sum(v * g_v, axis=0), 0.0, atol=1e-12)
    assert float(jnp.abs(g_v).max()) > 1e-3


# ----------------------------------------------------------------------------- multi-crop


def _plain(size, scale, **changes):
  fields = dict(crop_scale=scale, crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                gray_prob=0.0, blur_prob=0.0)
  return dino.ViewConfig(size, **{**fields, **changes})


def test_multicrop_views_sizes_and_per_image_keys():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8))
  floats = images / 255.0
  whole = dino.MultiCropConfig((_plain(16, (1.0, 1.0)), _plain(16, (1.0, 1.0), flip_prob=1.0)),
                               _plain(8, (1.0, 1.0)), local_crops=2)
  global_crops, local_crops = _multicrop(jax.random.key(0), images, whole)
  assert global_crops.shape == (2, 3, 16, 16, 3) and local_crops.shape == (2, 3, 8, 8, 3)
  np.testing.assert_allclose(global_crops[0], floats, atol=1e-5)  # the whole image
  np.testing.assert_allclose(global_crops[1], floats[:, :, ::-1], atol=1e-5)  # mirrored
  np.testing.assert_allclose(local_crops[1], jax.image.resize(
      floats, (3, 8, 8, 3), "linear", antialias=True), atol=1e-5)  # the whole image, at 8 px
  recipe = dino.MultiCropConfig(
      (dino.ViewConfig(16, blur_sigma=(0.1, 1.0)),
       dino.ViewConfig(16, blur_prob=0.1, solarize_prob=0.2, blur_sigma=(0.1, 1.0))),
      dino.ViewConfig(8, crop_scale=(0.05, 0.4), blur_prob=0.5, blur_sigma=(0.1, 1.0)), 3)
  a = _multicrop(jax.random.key(1), images, recipe)
  b = _multicrop(jax.random.key(1), images[:2], recipe)  # image i draws the same crops
  for x, y in zip(a, b):
    # Same keys, so the same crops, but not bit for bit: under the cheap compile options XLA
    # vectorises a batch of 3 and one of 2 differently (≤ 1 ulp, 1.2e-7, at the default
    # options they are equal). A key that depended on the batch draws another crop, off by
    # ~0.1–1, far above this tolerance.
    np.testing.assert_allclose(x[:, :2], y, rtol=0, atol=1e-6)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
  assert not np.allclose(a[0][0], a[0][1]) and not np.allclose(a[1][0], a[1][1])
  # The documented key: view v of image i from fold_in(fold_in(key, v), i), whatever the batch
  # or its sharding (another batch-independent scheme passes the check above, not this one).
  one_view = _jit(dino.augment_view, static_argnums=2)
  for v, i in ((0, 2), (3, 1)):
    view_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), v), i)
    crop = one_view(view_key, floats[i].astype(jnp.float32),
                    recipe.global_views[v] if v < 2 else recipe.local_view)
    got = a[0][v, i] if v < 2 else a[1][v - 2, i]
    np.testing.assert_allclose(got, crop, rtol=0, atol=1e-6)


def test_blur_keeps_constants_and_grayscale_and_solarize_closed_forms():
  flat = jnp.full((8, 8, 3), 0.3)
  np.testing.assert_allclose(dino.gaussian_blur(jax.random.key(0), flat, (0.5, 1.0)), flat,
                             rtol=1e-6)
  pixel = jnp.array([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(dino.grayscale(pixel), [[[0.299] * 3]], rtol=1e-6)
  np.testing.assert_allclose(dino.solarize(jnp.array([0.2, 0.5, 0.9])), [0.2, 0.5, 0.1],
                             rtol=1e-6)


# ----------------------------------------------------------------------------- one step


TINY = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=8)


def test_one_step_freezes_last_layer_updates_teacher_by_ema_and_centre_by_teacher_mean():
  head = dino.HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=24)
  crops = dino.MultiCropConfig((dino.ViewConfig(8, flip_prob=0.0),
                                dino.ViewConfig(8, flip_prob=0.0, blur_prob=0.1)),
                               dino.ViewConfig(4, crop_scale=(0.05, 0.4), flip_prob=0.0), 2)
  hyper = dino.Hyper(total_steps=10, freeze_last_layer_steps=1, warmup_teacher_temp_steps=5)
  optimizer = dino.make_optimizer(dino.cosine_schedule(1e-2, 1e-4, 10),
                                  dino.cosine_schedule(0.04, 0.4, 10), 3.0)
  step = _jit(functools.partial(dino.train_step, optimizer=optimizer, vit_config=TINY,
                                   crops=crops, hyper=hyper))
  state = dino.init_state(jax.random.key(0), TINY, head, optimizer)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8))
  key = jax.random.key(5)
  first, metrics = step(state, images, key)
  assert int(first.step) == 1
  # Frozen step: the prototypes do not move (no gradient, no weight decay); the rest does.
  np.testing.assert_array_equal(first.student["head"]["last_layer"]["kernel"],
                                state.student["head"]["last_layer"]["kernel"])
  assert not np.allclose(first.student["head"]["mlp"]["dense_0"]["kernel"],
                         state.student["head"]["mlp"]["dense_0"]["kernel"])
  assert not np.allclose(first.student["backbone"]["pos_embed"],
                         state.student["backbone"]["pos_embed"])
  # Teacher: the EMA of the new student with m(0) = 0.996; no gradient of its own.
  for t0, s1, t1 in zip(jax.tree.leaves(state.teacher), jax.tree.leaves(first.student),
                        jax.tree.leaves(first.teacher)):
    np.testing.assert_allclose(t1, 0.996 * t0 + 0.004 * s1, rtol=1e-6, atol=1e-7)
  # Centre: 0.9 · 0 + 0.1 · mean of the teacher's logits on this step's global crops.
  global_crops, _ = _multicrop(jax.random.fold_in(key, 0), images, crops)
  teacher_logits = _jit(dino.forward, static_argnums=2)(state.teacher, (global_crops,), TINY)
  np.testing.assert_allclose(first.center, 0.1 * teacher_logits.mean((0, 1)), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(metrics["teacher_temp"], 0.04, rtol=1e-6)
  assert math.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  second, metrics = step(first, images, key)  # unfrozen: the prototypes learn
  assert not np.allclose(second.student["head"]["last_layer"]["kernel"],
                         first.student["head"]["last_layer"]["kernel"])
  # Step 1's schedules: m(1) = 1 − 0.004 · (1 + cos(π/10)) / 2, τ_t(1) = 0.04 + 0.03 / 5.
  m1 = 1 - 0.004 * (1 + math.cos(math.pi / 10)) / 2
  np.testing.assert_allclose(metrics["momentum"], m1, rtol=0, atol=1e-7)
  np.testing.assert_allclose(metrics["teacher_temp"], 0.046, rtol=1e-6)
  for t1, s2, t2 in zip(jax.tree.leaves(first.teacher), jax.tree.leaves(second.student),
                        jax.tree.leaves(second.teacher)):
    np.testing.assert_allclose(t2, m1 * t1 + (1 - m1) * s2, rtol=1e-6, atol=1e-7)


def test_local_crops_run_at_their_size_through_resampled_position_embeddings():
  """`forward` on 16-px global and 8-px local crops equals, per group, the ViT built at that
  size, its 2 × 2 position grid the 4 × 4 one resampled (DINO's interpolate_pos_encoding), and
  the head on those features, global views first."""
  config = TINY.replace(image_size=16)
  head = dino.HeadConfig(hidden_dim=32, bottleneck_dim=16, out_dim=24)
  params = {"backbone": vit.init(config, jax.random.key(0)),
            "head": dino.init_head(jax.random.key(1), config.width, head)}
  rng = np.random.default_rng(0)
  global_crops = jnp.asarray(rng.uniform(size=(2, 3, 16, 16, 3)), jnp.float32)
  local_crops = jnp.asarray(rng.uniform(size=(2, 3, 8, 8, 3)), jnp.float32)
  logits = _jit(dino.forward, static_argnums=2)(params, (global_crops, local_crops), config)
  assert logits.shape == (4, 3, 24)

  small = config.replace(image_size=8)
  resampled = vit.resample_pos_embed(params["backbone"]["pos_embed"], 2, 2)
  assert resampled.shape == (1, 1 + 4, config.width)
  features = _jit(vit.forward, static_argnums=2)
  expected = []
  for crops, cfg, backbone in (
      (global_crops, config, params["backbone"]),
      (local_crops, small, {**params["backbone"], "pos_embed": resampled})):
    x = vit.preprocess(crops.reshape(-1, *crops.shape[2:]), cfg)
    expected.append(dino.head_apply(params["head"], features(backbone, x, cfg)).reshape(2, 3, 24))
  np.testing.assert_allclose(logits, np.concatenate(expected), rtol=1e-4, atol=1e-5)
  # The resampling matters: the local crops' features with the 4 × 4 grid's first 4 rows differ.
  truncated = {**params["backbone"], "pos_embed": params["backbone"]["pos_embed"][:, :5]}
  wrong = dino.head_apply(params["head"], features(
      truncated, vit.preprocess(local_crops.reshape(-1, 8, 8, 3), small), small))
  assert not np.allclose(wrong.reshape(2, 3, 24), logits[2:], atol=1e-3)


# ----------------------------------------------------------------------------- end to end


def _config(data_dir, *overrides):
  return config_lib.load("pretrain_dino_glyphs:smoke", [
      f"--config.data_dir={data_dir}", "--config.data.image_size=16",
      "--config.pretrain.dino.local_size=8", "--config.eval.ways=3",
      "--config.eval.episodes=4", "--config.eval.queries=1", *overrides])


def test_pool_drops_the_labels_and_configs_pick_their_objective(glyphs_data_dir, tmp_path):
  data_dir, _, _ = glyphs_data_dir
  domains = load_domains("glyphs:id", str(data_dir))
  (images,) = pretrain.ImagePool(domains, "train", 16, 8, seed=0).batch(3)
  labelled = pretrain.ClassificationData(domains, "train", 16, 8, seed=0).batch(3)
  np.testing.assert_array_equal(images, labelled[0])
  assert config_lib.load("pretrain_glyphs").pretrain.objective == "supervised"
  assert config_lib.load("pretrain_dino_glyphs").pretrain.objective == "dino"
  with pytest.raises(SmatError, match="pretrain.objective='byol'"):
    pretrain.pretrain(_config(data_dir, "--config.pretrain.objective=byol"), str(tmp_path))
  with pytest.raises(SmatError, match="local_size=6 must be a positive multiple"):
    pretrain.pretrain(_config(data_dir, "--config.pretrain.dino.local_size=6"), str(tmp_path))


def test_dino_run_writes_the_teacher_backbone_and_resumes_exactly(glyphs_data_dir, tmp_path):
  import orbax.checkpoint as ocp

  data_dir, _, _ = glyphs_data_dir
  config = _config(data_dir)
  whole = pretrain.pretrain(config, str(tmp_path / "whole"), progress=False)
  first = pretrain.pretrain(config, str(tmp_path / "split"), stop_after=3, progress=False)
  assert first == {"stopped_at": 3}
  resumed = pretrain.pretrain(config, str(tmp_path / "split"), progress=False)

  params, vit_config = checkpoint.load(str(tmp_path / "whole" / "backbone"))
  assert vit_config.image_size == 16 and vit_config.width == 128
  meta = json.loads((tmp_path / "whole" / "backbone" / "backbone.json").read_text())
  assert meta["objective"] == "dino" and meta["pool"] == "glyphs:id"
  again, _ = checkpoint.load(str(tmp_path / "split" / "backbone"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
  cells = lambda r: {(d, k): c["accuracy"] for d, row in r["report"].items()
                     for k, c in row.items()}
  assert cells(whole) == cells(resumed) and set(whole["report"]) == {"glyphs:id", "glyphs:ood"}
  rows = lambda run: {r["step"]: r for r in map(
      json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())}
  whole_rows, split_rows = rows("whole"), rows("split")
  assert sorted(whole_rows) == [2, 4, 6] and sorted(split_rows) == [2, 3, 4, 6]
  for step in (2, 4, 6):
    for name in ("loss", "teacher_entropy", "teacher_marginal_entropy", "grad_norm"):
      assert whole_rows[step][name] == split_rows[step][name], (step, name)

  # The backbone written is the teacher's (the checkpoint holds student, teacher, centre).
  saved = ocp.StandardCheckpointer().restore(tmp_path / "whole" / "checkpoints" / "6" / "default")
  assert set(saved) == {"student", "teacher", "center", "opt_state", "step"}
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(saved["teacher"]["backbone"])):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(params["pos_embed"], saved["student"]["backbone"]["pos_embed"])
  assert saved["center"].shape == (64,) and np.abs(saved["center"]).max() > 0
