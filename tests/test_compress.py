"""Backbone compression: unit importance against finite differences, exact per-layer counts, and
the physically pruned model against the zeroed one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import fewshot
from smat.data import episodes as ep
from smat.models import layout, vit
from smat.sparsity import compress

CFG = vit.ViTConfig(patch_size=4, width=16, depth=3, num_heads=4, mlp_dim=32, image_size=16)


def make_episode(seed: int) -> ep.Episode:
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(3, dtype=np.int32), 2)
  image = lambda: rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  return ep.Episode(image(), labels, np.ones(6, bool), image(), labels, np.ones(6, bool),
                    np.ones(3, bool), np.asarray(0, np.int32))


def theta():
  return vit.init(CFG, jax.random.key(0))


def test_kept_units_are_the_top_units_of_each_layer_in_exact_counts():
  scores = np.asarray([[0.1, 0.4, 0.2, 0.4], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
  kept = np.asarray(jax.jit(compress.kept_units)(scores, jnp.asarray([2, 1, 0])))
  np.testing.assert_array_equal(kept, [[False, True, False, True], [True, False, False, False],
                                       [False, False, False, False]])


def test_kept_counts_keep_each_layer_s_rate_of_parameters_to_within_one_channel():
  head, channel = compress.unit_sizes(CFG)
  assert (head, channel) == (3 * (16 * 4 + 4) + 4 * 16, 33)
  layer = 4 * head + 32 * channel
  rates = np.asarray([1.0, 0.8, 0.55, 0.3, 0.0])
  heads, channels = (np.asarray(c) for c in jax.jit(compress.kept_counts, static_argnums=1)(
      rates, CFG))
  np.testing.assert_array_equal(heads, np.round(rates * 4))
  assert channels[0] == 32 and channels[-1] == 0
  kept = heads * head + channels * channel
  assert np.all(np.abs(kept - rates * layer) <= channel / 2 + 1e-6)


def test_pruned_model_computes_what_the_zeroed_model_computes():
  params = theta()
  rng = np.random.default_rng(1)
  heads = rng.random((3, 4)) < 0.5
  channels = rng.random((3, 32)) < 0.5
  heads[1], channels[2] = False, False  # a layer without attention, one without an MLP
  heads[0, 0] = channels[0, 0] = True
  images = vit.preprocess(make_episode(2).support_images, CFG)
  small = compress.prune(params, heads, channels, CFG)
  np.testing.assert_allclose(
      compress.pruned_forward(small, images, CFG),
      vit.forward(compress.zero_pruned(params, heads, channels, CFG), images, CFG),
      rtol=1e-4, atol=1e-5)
  full = compress.prune(params, np.ones((3, 4), bool), np.ones((3, 32), bool), CFG)
  np.testing.assert_allclose(compress.pruned_forward(full, images, CFG),
                             vit.forward(params, images, CFG), rtol=1e-4, atol=1e-5)
  assert vit.count_params(full) == vit.count_params(params)
  removed = vit.count_params(full) - vit.count_params(small)
  dh = 16 // 4
  per_head = 3 * (16 * dh + dh) + dh * 16  # q, k, v columns and biases; proj rows
  per_channel = 16 + 1 + 16  # fc1 column and bias; fc2 row
  assert removed == (~heads).sum() * per_head + (~channels).sum() * per_channel


def test_pruned_layers_have_the_backbone_s_layer_tree():
  """A pruned layer is `layout.layer`'s tree with narrower leaves: the pure block reads both."""
  params = theta()
  heads, channels = np.ones((3, 4), bool), np.ones((3, 32), bool)
  heads[0, 1] = channels[2, :5] = False
  small = compress.prune(params, heads, channels, CFG)
  assert set(small) == set(params)
  for l, pruned in enumerate(small[layout.BLOCKS]):
    whole = layout.layer(params[layout.BLOCKS], l)
    assert jax.tree.structure(pruned) == jax.tree.structure(whole)
  assert small["blocks"][0]["attn"]["query"]["kernel"].shape == (16, 12)
  assert small["blocks"][2]["fc2"]["kernel"].shape == (27, 16)


def test_unit_importance_is_the_derivative_of_the_support_loss_along_the_unit_scale():
  """score = |d/ds M(θ with the unit's output rows scaled by s)| at s = 1 (central differences)."""
  params = jax.tree.map(lambda p: p.astype(jnp.float32), theta())
  episode = make_episode(3)
  heads, channels = compress.unit_importance(params, [ep.stack([episode])], CFG)
  assert heads.shape == (3, 4) and channels.shape == (3, 32)
  loss = jax.jit(lambda p: compress.support_loss(p, episode, CFG))
  eps = 1e-2

  def scaled(kind, layer, unit, s):
    blocks = params["blocks"]
    if kind == "head":
      w = blocks["attn"]["proj"]["kernel"]
      w = w.at[layer, unit * 4:(unit + 1) * 4].multiply(s)
      attn = {**blocks["attn"], "proj": {**blocks["attn"]["proj"], "kernel": w}}
      return {**params, "blocks": {**blocks, "attn": attn}}
    w = blocks["fc2"]["kernel"].at[layer, unit].multiply(s)
    return {**params, "blocks": {**blocks, "fc2": {**blocks["fc2"], "kernel": w}}}

  checked = 0
  for kind, table in (("head", heads), ("channel", channels)):
    for layer in range(3):
      unit = int(np.argmax(table[layer]))  # the strongest unit: well above rounding noise
      fd = (loss(scaled(kind, layer, unit, 1 + eps)) - loss(scaled(kind, layer, unit, 1 - eps)))
      np.testing.assert_allclose(abs(float(fd)) / (2 * eps), table[layer, unit], rtol=0.05)
      checked += 1
  assert checked == 6


def test_fitness_of_keeping_everything_or_nothing_is_that_model_s_accuracy():
  params = theta()
  batches = [ep.stack([make_episode(4), make_episode(5)])]
  importance = compress.unit_importance(params, batches, CFG)
  fitness = compress.compression_fitness(params, CFG, importance, batches)
  unpruned = 100.0 * float(np.mean(fewshot.batch_accuracy(params, batches[0], CFG)))
  assert fitness(np.ones(3)) == unpruned
  zeroed = compress.zero_pruned(params, np.zeros((3, 4), bool), np.zeros((3, 32), bool), CFG)
  assert fitness(np.zeros(3)) == 100.0 * float(np.mean(
      fewshot.batch_accuracy(zeroed, batches[0], CFG)))


def test_compression_benchmark_measures_each_point_once_and_resumes(monkeypatch, tmp_path):
  """experiments/compression.py on the tiny model with evaluation replaced by a recorder of the
  pruned parameters: uniform and searched rates per sparsity, searched rates keep the mean,
  the evaluated model is the zeroed one, and finished points are reused."""
  import json

  from experiments import compression

  params = theta()
  batches = [ep.stack([make_episode(6), make_episode(7)])]
  monkeypatch.setattr(compression, "model_params", lambda run, which: (params, CFG, None))
  monkeypatch.setattr(compression.metatrain, "validation_batches", lambda config, n: batches)
  monkeypatch.setattr(compression.tables, "run_image_size", lambda run: 16)
  monkeypatch.setattr(compression.sweep.spec_lib, "load_domains", lambda spec, seed: [spec])
  evaluated = []

  def evaluate_model(model, groups, protocol, progress):
    zeroed, _ = model
    kept = float((np.abs(np.asarray(zeroed["blocks"]["fc2"]["kernel"])).sum(-1) > 0).mean())
    evaluated.append(kept)
    return {s: {"accuracy": 100 * kept, "ci95": 1.0, "per_episode": [100 * kept]}
            for s in groups}

  monkeypatch.setattr(compression.evaluate, "evaluate", evaluate_model)
  out = str(tmp_path / "out")
  args = ["--sparsities", "0.25,0.5", "--population", "3", "--generations", "1",
          "--batch", "2", "--repeats", "1", "--episodes", "1", "--id", "a", "--ood", "b",
          "--out", out]
  assert compression.main(args) == 0
  points = json.load(open(out + ".json"))["points"]
  assert [(p["sparsity"], p["rates_from"]) for p in points] == [
      (0.0, "unpruned"), (0.25, "uniform"), (0.25, "searched"), (0.5, "uniform"),
      (0.5, "searched")]
  for p in points:
    assert np.mean(p["rates"]) == pytest.approx(1.0 - p["sparsity"])
    heads, channels = compress.kept_counts(np.asarray(p["rates"]), CFG)
    assert (p["heads_kept"], p["channels_kept"]) == (heads.tolist(), channels.tolist())
    assert p["prunable_sparsity"] == pytest.approx(p["sparsity"], abs=0.02)
  np.testing.assert_allclose(evaluated, [np.mean(p["channels_kept"]) / 32 for p in points])
  assert points[0]["total_sparsity"] == 0.0 and points[3]["prunable_sparsity"] > 0.45
  assert "| 0.5 | uniform | [2, 2, 2] | [16, 16, 16] |" in open(out + ".md").read()  # exact
  assert (tmp_path / "out.png").stat().st_size > 0
  assert compression.main(args) == 0 and len(evaluated) == 5  # resumed: nothing re-measured
