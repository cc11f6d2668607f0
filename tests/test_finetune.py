"""Fine-tuned meta-test (smat/finetune.py): adapters, the evaluator, the lr search, episodes.

Everything runs a one-block 16-wide ViT on 16-px images; one fine-tuning config per kind of
episode (synthetic or glyphs) so the jitted functions compile as few times as possible.
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import cli, evaluate, fewshot, finetune, metatrain
from smat.data import augment, loader
from smat.data import episodes as ep
from smat.data.samplers import FixedSampler
from smat.data.spec import load_domains
from smat.errors import SmatError
from smat.meta import experts, gates, router
from smat.meta import step as meta_step
from smat.meta import tasks
from smat.models import checkpoint, vit

import cheap_compile

CFG = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
FT = finetune.FinetuneConfig(steps=2, lrs=(0.0, 1e-3), search_episodes=2)  # synthetic episodes
# Glyph episodes: the CLI builds the same config from its flags, so its compiles are reused.
FT_GLYPHS = finetune.FinetuneConfig(steps=1, lrs=(0.0, 1e-3), search_episodes=2)
SEED = 3
SAMPLER = FixedSampler(3, 1, 1)
SMAT_HP = tasks.Hyper.of(method="smat", vit=CFG, num_experts=2)

# XLA's cheapest CPU settings: these tests are dominated by compile time, not run time.
_CHEAP_COMPILE = cheap_compile.options()


def cheap_jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_CHEAP_COMPILE, **kwargs)


_init = cheap_jit(vit.init, static_argnums=0)
_forward = cheap_jit(vit.forward, static_argnums=2)
_features = cheap_jit(lambda adapter, theta, trainable, images, key: adapter.features(
    theta, trainable, None, images, key, CFG), static_argnums=0)
# (trained params, support losses): the adapter state is only needed for strategies.
_adapt_state = cheap_jit(finetune.adapt, static_argnums=(0, 6, 7))
_adapt = lambda *args: _adapt_state(*args)[::2]
_query_accuracy_state = cheap_jit(finetune.query_accuracy, static_argnums=(0, 5, 6))
_query_accuracy = lambda adapter, theta, tuned, episode, config, ft: _query_accuracy_state(
    adapter, theta, tuned, None, episode, config, ft)
_support_augment = cheap_jit(augment.support_augment, static_argnums=(2, 3))
# The library's jitted functions, compiled cheaply (the same functions: `cheap_library`).
_finetune_batch = cheap_jit(finetune.finetune_batch,
                            static_argnames=("adapter", "hp", "config", "ft"))
_batch_accuracy = cheap_jit(fewshot.batch_accuracy, static_argnums=2)
_zero_shot_batch = cheap_jit(meta_step.zero_shot_batch, static_argnames="hp")
_router_init = cheap_jit(router.init, static_argnums=(1, 2))


@pytest.fixture
def cheap_library(monkeypatch):
  """Routes the library's jitted calls through the cheaply compiled copies above."""
  monkeypatch.setattr(finetune, "finetune_batch", _finetune_batch)
  monkeypatch.setattr(fewshot, "batch_accuracy", _batch_accuracy)
  monkeypatch.setattr(metatrain, "_zero_shot", _zero_shot_batch)


def theta(seed: int = 0) -> dict:
  return _init(CFG, jax.random.key(seed))


def random_images(rng, n: int) -> np.ndarray:
  return rng.integers(0, 256, (n, CFG.image_size, CFG.image_size, 3), dtype=np.uint8)


def make_episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 2) -> ep.Episode:
  """Random uint8 images, labels 0..ways-1 in class order."""
  rng = np.random.default_rng(seed)
  labels = lambda n: np.repeat(np.arange(ways, dtype=np.int32), n)
  return ep.Episode(random_images(rng, ways * shots), labels(shots), np.ones(ways * shots, bool),
                    random_images(rng, ways * queries), labels(queries),
                    np.ones(ways * queries, bool), np.ones(ways, bool), np.asarray(0, np.int32))


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def tree_max_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(a), leaves(b)) if x.size)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)


def recorder(log: list, fn, pick):
  """`fn`, which first appends `pick(*args, **kwargs)` to `log`."""

  def call(*args, **kwargs):
    log.append(pick(*args, **kwargs))
    return fn(*args, **kwargs)

  return call


def glyph_source(data_dir, spec: str = "glyphs:ood", first: int = 0) -> loader.EpisodeSource:
  return loader.EpisodeSource(tuple(load_domains(spec, str(data_dir))), "test", SAMPLER,
                              CFG.image_size, seed=SEED, first=first)


# ----------------------------------------------------------------------------- adapters


def test_lora_at_init_is_the_task_model_and_merges_into_query_and_value():
  """B = 0 makes LoRA exactly θ_task (dropout or not); a non-zero B is the weight merge
  W + (α/r)·A B of the query and value kernels when dropout is off."""
  params = theta()
  images = vit.preprocess(random_images(np.random.default_rng(0), 4), CFG)
  lora = finetune.LoRA()
  factors = lora.init(params, jax.random.key(1))
  assert set(factors) == {"query", "value"}
  assert factors["query"]["lora_a"].shape == (1, 16, 8)
  assert np.all(np.abs(factors["query"]["lora_a"]) <= 1 / math.sqrt(16))
  expected = np.asarray(_forward(params, images, CFG))
  np.testing.assert_array_equal(_features(lora, params, factors, images, None), expected)
  np.testing.assert_array_equal(_features(lora, params, factors, images, jax.random.key(2)),
                                expected)

  k_q, k_v = jax.random.split(jax.random.key(3))
  factors = {name: {**f, "lora_b": 0.3 * jax.random.normal(k, f["lora_b"].shape)}
             for (name, f), k in zip(factors.items(), (k_q, k_v))}
  attn = dict(params["blocks"]["attn"])
  for name, f in factors.items():
    delta = (lora.alpha / lora.rank) * jnp.einsum("lir,lro->lio", f["lora_a"], f["lora_b"])
    attn[name] = {**attn[name], "kernel": attn[name]["kernel"] + delta}
  merged = {**params, "blocks": {**params["blocks"], "attn": attn}}
  merged_out = np.asarray(_forward(merged, images, CFG))
  out = np.asarray(_features(lora, params, factors, images, None))
  assert np.max(np.abs(out - expected)) > 1e-2
  np.testing.assert_allclose(out, merged_out, atol=1e-5)
  # With a key, dropout (rate 0.1) changes the low-rank path; at rate 0 it is the merge again.
  dropped = np.asarray(_features(lora, params, factors, images, jax.random.key(4)))
  assert np.max(np.abs(dropped - merged_out)) > 1e-4
  no_dropout = finetune.LoRA(dropout=0.0)
  np.testing.assert_allclose(_features(no_dropout, params, factors, images, jax.random.key(4)),
                             merged_out, atol=1e-5)


def test_protonet_evaluator_scores_a_hand_checkable_episode():
  """Queries that copy the support images are all classified as their copy's class, so with
  2 of 6 queries relabelled the accuracy is exactly 4/6, through every route."""
  rng = np.random.default_rng(5)
  support = random_images(rng, 3)
  true = np.array([0, 0, 1, 1, 2, 2], np.int32)
  relabelled = np.array([0, 2, 1, 0, 2, 2], np.int32)  # queries 1 and 3 get a wrong label
  episode = ep.Episode(support, np.arange(3, dtype=np.int32), np.ones(3, bool), support[true],
                       relabelled, np.ones(6, bool), np.ones(3, bool), np.asarray(0, np.int32))
  params, full = theta(), finetune.Full()
  acc = float(_query_accuracy(full, params, params, episode, CFG, FT))
  assert acc == pytest.approx(4 / 6, abs=1e-6)
  acc_true = _query_accuracy(full, params, params, episode._replace(query_labels=true), CFG, FT)
  assert float(acc_true) == 1.0
  batch = ep.stack([episode, episode._replace(query_labels=true)])
  keys = jnp.stack([finetune.episode_key(0, 0), finetune.episode_key(0, 1)])
  acc, losses = _finetune_batch(finetune.TaskModel(params), batch, keys, jnp.zeros(2),
                                adapter=full, hp=None, config=CFG, ft=FT)
  np.testing.assert_allclose(np.asarray(acc), [4 / 6, 1.0], atol=1e-6)
  assert losses.shape == (2, FT.steps) and np.all(np.isfinite(losses))


def test_lr_zero_changes_nothing():
  """AdamW at lr 0 leaves θ_task bit for bit and LoRA's B at 0; lr 1e-3 moves both."""
  params, episode, key = theta(), make_episode(1), jax.random.key(7)
  full, losses = _adapt(finetune.Full(), params, None, episode, key, 0.0, CFG, FT)
  assert_trees_equal(full, params)
  assert losses.shape == (FT.steps,) and np.all(np.asarray(losses) > 0)
  lora = finetune.LoRA()
  factors, _ = _adapt(lora, params, None, episode, key, 0.0, CFG, FT)
  assert_trees_equal(factors, lora.init(params, jax.random.split(key)[0]))
  assert not any(np.any(f["lora_b"]) for f in factors.values())
  moved, _ = _adapt(finetune.Full(), params, None, episode, key, 1e-3, CFG, FT)
  assert tree_max_diff(moved, params) > 1e-4
  factors, _ = _adapt(lora, params, None, episode, key, 1e-3, CFG, FT)
  assert all(np.max(np.abs(f["lora_b"])) > 1e-4 for f in factors.values())


def test_support_loss_is_the_augmented_support_against_clean_prototypes():
  """Without augmentation (and at lr 0) every step's loss is the hand-computed cross-entropy
  of the support against its own prototypes; with it the steps see other images."""
  params, episode, key = theta(), make_episode(1), jax.random.key(7)
  f = np.asarray(_forward(params, vit.preprocess(episode.support_images, CFG), CFG), np.float64)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  protos = np.stack([f[episode.support_labels == c].mean(0) for c in range(3)])
  logits = 10.0 * unit(f) @ unit(protos).T
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_p[np.arange(6), episode.support_labels].mean()
  clean = dataclasses.replace(FT, augment_prob=0.0)
  _, losses = _adapt(finetune.Full(), params, None, episode, key, 0.0, CFG, clean)
  np.testing.assert_allclose(np.asarray(losses), [ce, ce], rtol=1e-5)
  _, losses = _adapt(finetune.Full(), params, None, episode, key, 0.0, CFG, FT)
  assert np.max(np.abs(np.asarray(losses) - ce)) > 1e-3


def test_optimizers_are_adamw_with_lora_at_ten_times_the_lr():
  """First AdamW step: Δ = −lr · (g / (|g| + 1e-8) + 0.01 · p), lr × 10 for LoRA."""
  p, g = {"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([0.5, -3.0, 1e-3])}
  expected = lambda lr: -lr * (np.asarray(g["w"]) / (np.abs(g["w"]) + 1e-8) + 0.01 * p["w"])
  for adapter, scale in ((finetune.Full(), 1.0), (finetune.Sparse(), 1.0),
                         (finetune.LoRA(), 10.0)):
    optimizer = adapter.optimizer(1e-3)
    updates, _ = optimizer.update(g, optimizer.init(p), p)
    np.testing.assert_allclose(updates["w"], expected(1e-3 * scale), rtol=1e-5)


def test_sparse_finetuning_only_moves_selected_entries():
  """Entries outside `selected` stay exactly as they were; most selected ones move."""
  params, episode = theta(), make_episode(2)
  rng = np.random.default_rng(8)
  selected = jax.tree.map(lambda p: rng.random(p.shape) < 0.5, params)
  tuned, _ = _adapt(finetune.Sparse(), params, selected, episode, jax.random.key(9), 1e-2, CFG,
                    FT)
  moved = kept = chosen = 0
  for before, after, sel in zip(leaves(params), leaves(tuned), leaves(selected)):
    np.testing.assert_array_equal(after[~sel], before[~sel])
    moved += int(np.sum(after[sel] != before[sel]))
    chosen += int(sel.sum())
    kept += int((~sel).sum())
  assert kept > 0 and moved > 0.9 * chosen


def test_selected_broadcasts_structured_masks_and_selects_nothing_without_gates():
  """A structured [L, in, 1] mask selects whole rows of the kernel; an empty [0] mask (a leaf
  without gates) selects nothing; an unstructured mask selects its non-zero entries."""
  params = {"kernel": jnp.ones((2, 3, 4)), "cls": jnp.ones((1, 1, 5)), "bias": jnp.ones((2, 3))}
  row = np.array([[0.0, 0.5, 0.0], [1.0, 0.0, 0.2]], np.float32)
  bias = np.array([[0.0, 0.3, 0.0], [0.0, 0.0, 1.0]], np.float32)
  merged = {"kernel": jnp.asarray(row[..., None]), "cls": jnp.zeros((0,)),
            "bias": jnp.asarray(bias)}
  sel = experts.selected(merged, params)
  assert sel["kernel"].shape == (2, 3, 4) and sel["kernel"].dtype == bool
  np.testing.assert_array_equal(sel["kernel"], np.repeat(row[..., None] != 0, 4, axis=-1))
  np.testing.assert_array_equal(sel["cls"], np.zeros((1, 1, 5), bool))
  np.testing.assert_array_equal(sel["bias"], bias != 0)


@functools.cache
def smat_model():
  """(θ_pre, params, router state) of SMAT with 2 experts, structured gates and frozen
  embeddings: the router of `router.init`, a random δ, log α ~ N(0, 0.5²) with half the gate
  entries closed in both experts (so the merged mask has zeros). Built in numpy (tracing
  `meta_step.init_params` costs seconds), with `init_params`'s tree structure."""
  theta_pre, rng = theta(), np.random.default_rng(11)
  count = SMAT_HP.experts.num_experts

  def gate(shape):
    if shape is None:
      return jnp.zeros((count, 0))
    log_alpha = np.clip(0.5 * rng.normal(size=(count,) + shape), gates.LOG_ALPHA_MIN,
                        gates.LOG_ALPHA_MAX)
    return jnp.asarray(np.where(rng.random(shape) < 0.5, gates.LOG_ALPHA_MIN, log_alpha),
                       jnp.float32)

  shapes = experts.gate_shapes(theta_pre, structured=True, freeze_embeddings=True)
  router_params, router_state = _router_init(jax.random.key(11), CFG.width, count)
  params = {"delta": jax.tree.map(lambda p: jnp.asarray(0.05 * rng.normal(size=p.shape),
                                                        jnp.float32), theta_pre),
            "gates": jax.tree.map(gate, shapes, is_leaf=lambda x: x is None or
                                  isinstance(x, tuple)),
            "lam": jnp.zeros((count,)), "router": router_params}
  structured = dataclasses.replace(SMAT_HP, experts=dataclasses.replace(
      SMAT_HP.experts, structured=True, freeze_embeddings=True))
  reference = jax.eval_shape(lambda key: meta_step.init_params(key, theta_pre, structured),
                             jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, (params, router_state)) == jax.tree.map(
      lambda x: x.shape, reference)
  return theta_pre, params, router_state


def test_sparse_finetuning_of_a_smat_task_follows_its_merged_mask():
  """At lr 1e-2 only the entries of the task's merged mask move: whole kernel rows for
  structured gates, nothing in the embeddings (no gates); `finetune_batch` takes these steps.
  (At lr 0 it is SMAT zero-shot: see `test_same_seed_gives_the_same_episodes_...`.)"""
  theta_pre, params, router_state = smat_model()
  model = finetune.TaskModel(theta_pre, params, router_state, float(SMAT_HP.temperature(0)))

  @cheap_jit
  def tune(model, episode, key):
    task, merged = finetune.task_theta(model, episode, SMAT_HP)
    selected = experts.selected(merged, task)
    tuned, _, losses = finetune.adapt(finetune.Sparse(), task, selected, episode, key, 1e-2,
                                      CFG, FT)
    accuracy = finetune.query_accuracy(finetune.Sparse(), task, tuned, selected, episode, CFG,
                                       FT)
    return task, merged, tuned, losses, accuracy

  episode, key = make_episode(3), finetune.episode_key(0, 0)
  task, merged, tuned, losses, accuracy = tune(model, episode, key)
  # `finetune_batch` is these steps: the same losses (the second one after a masked step).
  batch_accuracy, batch_losses = _finetune_batch(
      model, ep.stack([episode]), key[None], jnp.full((1,), 1e-2), adapter=finetune.Sparse(),
      hp=SMAT_HP, config=CFG, ft=FT)
  np.testing.assert_allclose(np.asarray(batch_losses[0]), np.asarray(losses), atol=1e-5)
  assert float(batch_accuracy[0]) == float(accuracy)
  assert tree_max_diff(task, theta_pre) > 1e-3  # θ_task is not θ_pre
  names = [experts.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(task)[0]]
  rows_moved = rows_kept = entries_moved = 0
  for name, before, after, m in zip(names, leaves(task), leaves(tuned), leaves(merged)):
    changed = after != before
    if experts.is_embedding(name):
      assert m.size == 0 and not changed.any(), name
    elif name.startswith("blocks/") and name.endswith("kernel"):
      assert m.shape == before.shape[:-1] + (1,), name
      closed = np.broadcast_to(m == 0, before.shape)
      assert not changed[closed].any(), name
      rows_moved += int(changed.any(-1)[m[..., 0] != 0].sum())
      rows_kept += int((m == 0).sum())
    else:
      assert m.shape == before.shape and not changed[m == 0].any(), name
      entries_moved += int(changed[m != 0].sum())
  total_rows = sum(int(m.size) for n, m in zip(names, leaves(merged))
                   if n.startswith("blocks/") and n.endswith("kernel"))
  assert rows_kept > 0 and rows_moved == total_rows - rows_kept and entries_moved > 0


def test_sparse_needs_a_smat_model():
  """Pre and PMF have no merged mask, so sparse fine-tuning refuses them up front."""
  pmf = metatrain.Run(tasks.Hyper.of(method="pmf", vit=CFG), theta(), {}, {}, 0)
  for model in ((theta(), CFG), pmf):
    with pytest.raises(SmatError, match="SMAT"):
      finetune._jobs_accuracy(model, finetune.Sparse(), None, [(0, 0.0)], 0, FT, 1)


def test_padded_episode_gives_the_same_adaptation():
  """Padding the support, query and ways (masked out) changes neither the support losses nor
  the adapted model (full or LoRA): a batch pads its episodes to its largest bucket."""
  params, episode, key = theta(), make_episode(6), jax.random.key(10)
  padded = ep.pad(episode, (4, 8, 9))
  assert padded.shape_key == (4, 8, 9) and not padded.class_mask[3]
  full = finetune.Full()
  tuned, losses = _adapt(full, params, None, episode, key, 1e-3, CFG, FT)
  tuned_p, losses_p = _adapt(full, params, None, padded, key, 1e-3, CFG, FT)
  np.testing.assert_allclose(np.asarray(losses_p), np.asarray(losses), atol=1e-5)
  # The attention key bias has an exactly-zero gradient (softmax ignores a shift shared by all
  # keys), so Adam turns rounding noise into ±lr steps there; every other entry must agree.
  key_bias = lambda tree: tree["blocks"]["attn"]["key"]["bias"]
  assert tree_max_diff(key_bias(tuned_p), key_bias(params)) <= FT.steps * 1e-3 * 1.01
  drop = lambda tree: {**tree, "blocks": {**tree["blocks"], "attn": {
      k: v for k, v in tree["blocks"]["attn"].items() if k != "key"}}}
  assert tree_max_diff(drop(tuned_p), drop(tuned)) < 1e-6
  assert tree_max_diff(drop(tuned), drop(params)) > 1e-4
  acc = float(_query_accuracy(full, params, tuned, episode, CFG, FT))
  acc_p = float(_query_accuracy(full, params, tuned_p, padded, CFG, FT))
  assert acc_p == acc
  # Unmasked padding would change the loss: count the padded (black, label 0) support images.
  leaky = padded._replace(support_mask=np.ones(8, bool))
  _, losses_leaky = _adapt(full, params, None, leaky, key, 1e-3, CFG, FT)
  assert np.max(np.abs(np.asarray(losses_leaky) - np.asarray(losses))) > 1e-3
  # LoRA too: its dropout masks of the real rows do not depend on the padded batch size.
  lora = finetune.LoRA()
  factors, losses = _adapt(lora, params, None, episode, key, 1e-3, CFG, FT)
  factors_p, losses_p = _adapt(lora, params, None, padded, key, 1e-3, CFG, FT)
  np.testing.assert_allclose(np.asarray(losses_p), np.asarray(losses), atol=1e-5)
  assert tree_max_diff(factors_p, factors) < 1e-6


# ----------------------------------------------------------------------------- augmentation


def _shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """out[y, x] = image[y + dy, x + dx], zero outside."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
  out[ys, xs] = image[max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)]
  return out


def _colour_fit(image: np.ndarray, out: np.ndarray) -> bool:
  """Whether `out` is DiffAugment colour of `image`: out's channel mean = a · image's + b with
  a ∈ [½, 1½), and out − its channel mean = k · (image − its channel mean) with k ∈ [0, 3)."""
  mean_in, mean_out = image.mean(-1), out.mean(-1)
  a, b = np.polyfit(mean_in.ravel(), mean_out.ravel(), 1)
  dev_in, dev_out = image - mean_in[..., None], out - mean_out[..., None]
  k = float(np.sum(dev_in * dev_out) / np.sum(dev_in * dev_in))
  return bool(0.5 <= a < 1.5 and 0 <= k < 3 and np.allclose(a * mean_in + b, mean_out, atol=1e-4)
              and np.allclose(k * dev_in, dev_out, atol=1e-4))


def test_support_augment_colour_translation_and_padding():
  """prob 0 is the identity; colour is DiffAugment's brightness, saturation and contrast;
  translation is an integer zero-filled shift of at most 2 px at 16 px; padding the batch
  leaves the real images' augmentation unchanged."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)), jnp.float32)
  key = jax.random.key(0)
  np.testing.assert_array_equal(_support_augment(key, images, 0.0, 0.125), images)

  # Brightness adds U(−½, ½) per image; saturation and contrast leave a constant image as is.
  base = jnp.broadcast_to(0.3 * jnp.arange(4.0)[:, None, None, None], (4, 16, 16, 3))
  offsets = []
  for constant in (base, base + 1.0):
    out = np.asarray(_support_augment(key, constant, 1.0, 0.0)) - np.asarray(constant)
    np.testing.assert_allclose(out, out[:, :1, :1, :1] + np.zeros_like(out), atol=1e-5)
    offsets.append(out[:, 0, 0, 0])
  np.testing.assert_allclose(offsets[1], offsets[0], atol=1e-5)
  assert np.all(np.abs(offsets[0]) <= 0.5) and len(np.unique(offsets[0].round(6))) == 4

  # Colour on a random image: the per-pixel channel mean maps affinely with slope (contrast)
  # in [½, 1½), the deviation from it scales by saturation × contrast in [0, 3); the whole
  # batch is flipped along the width, or not.
  flips = set()
  for seed in range(4):
    out = np.asarray(_support_augment(jax.random.key(seed), images, 1.0, 0.0))
    fits = {flip: [_colour_fit(np.asarray(x)[:, ::-1] if flip else np.asarray(x), o)
                   for x, o in zip(images, out)] for flip in (False, True)}
    good = [flip for flip, f in fits.items() if all(f)]
    assert len(good) == 1
    flips.add(good[0])
  assert flips == {False, True}

  shifts = []
  for seed in range(4):
    key = jax.random.key(seed)
    colored = np.asarray(_support_augment(key, images, 1.0, 0.0))
    shifted = np.asarray(_support_augment(key, images, 1.0, 0.125))
    assert shifted.shape == images.shape
    for c, s in zip(colored, shifted):
      match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(_shift(c, dy, dx), s)]
      assert len(match) == 1
      shifts.append(match[0])
    extra = jnp.concatenate([images, jnp.zeros((3, 16, 16, 3))])
    np.testing.assert_array_equal(_support_augment(key, extra, 0.9, 0.125)[:6],
                                  _support_augment(key, images, 0.9, 0.125))
  assert len(set(shifts)) > 3


# ----------------------------------------------------------------------------- lr search


def test_mean_ci_is_196_population_std_over_sqrt_n():
  assert fewshot.mean_ci([0.0, 1.0, 1.0, 0.0]) == pytest.approx((0.5, 0.49), abs=1e-12)
  values = [0.2, 0.4, 0.9]  # mean 0.5, population variance (0.09 + 0.01 + 0.16) / 3
  assert fewshot.mean_ci(values) == pytest.approx(
      (0.5, 1.96 * math.sqrt(0.26 / 3) / math.sqrt(3)), abs=1e-12)
  summary = fewshot.accuracy_summary([np.array([0.0, 1.0]), np.array([1.0, 0.0])], 2.0)
  assert summary.pop("per_episode") == [0.0, 100.0, 100.0, 0.0]
  assert summary == pytest.approx({"accuracy": 50.0, "ci95": 49.0, "episodes": 4,
                                   "episodes_per_s": 2.0})


def test_search_picks_the_best_lr_and_breaks_ties_to_the_smaller(monkeypatch):
  """Mean query accuracy per lr decides; equal means go to the smaller lr whatever the order
  of the grid; lr 0 runs no steps."""
  table = {0.0: [0.5, 0.5], 1e-4: [0.6, 0.8], 1e-3: [0.8, 0.6], 1e-2: [1.0, 0.2]}
  calls = []

  def fake(model, adapter, source, jobs, seed, ft, batch_size, progress=None):
    calls.append((jobs, ft.steps))
    return [table[lr][i] for i, lr in jobs]

  monkeypatch.setattr(finetune, "_jobs_accuracy", fake)
  for lrs in ((0.0, 1e-4, 1e-3, 1e-2), (1e-2, 1e-3, 1e-4, 0.0)):
    calls.clear()
    ft = finetune.FinetuneConfig(steps=7, lrs=lrs, search_episodes=2)
    best, means = finetune.search_lr(None, finetune.Full(), None, 0, ft)
    assert best == 1e-4
    assert means == pytest.approx({0.0: 50.0, 1e-4: 70.0, 1e-3: 70.0, 1e-2: 60.0})
    assert {jobs[0][1]: steps for jobs, steps in calls} == {0.0: 0, 1e-4: 7, 1e-3: 7, 1e-2: 7}
    assert all([i for i, _ in jobs] == [0, 1] for jobs, _ in calls)


def test_lr_search_episodes_are_not_reported(glyphs_data_dir, monkeypatch, cheap_library):
  """The search uses stream episodes 0, 1; the reported ones are 2, 3, 4, each with its own
  adaptation key, and the summary is the mean and CI of exactly those."""
  data_dir, _, _ = glyphs_data_dir
  source, model = glyph_source(data_dir), (theta(), CFG)
  calls = []
  monkeypatch.setattr(finetune, "_jobs_accuracy", recorder(
      calls, finetune._jobs_accuracy,
      lambda model, adapter, source, jobs, *_, **__: ([source.first + i for i, _ in jobs],
                                                      {lr for _, lr in jobs})))

  def direct(stream, lr):
    """Accuracies (%) of stream episodes `stream`, each adapted alone with its own key."""
    run = dataclasses.replace(FT_GLYPHS, steps=0) if lr == 0 else FT_GLYPHS
    return [100.0 * float(_finetune_batch(
        finetune.TaskModel(model[0]), ep.stack([source.episode(i)]),
        finetune.episode_key(SEED, i)[None], jnp.full((1,), lr), adapter=finetune.Full(),
        hp=None, config=CFG, ft=run)[0][0]) for i in stream]

  result = finetune.evaluate_source(model, finetune.Full(), source, 3, SEED, FT_GLYPHS)
  assert calls == [([0, 1], {0.0}), ([0, 1], {1e-3}), ([2, 3, 4], {result["lr"]})]
  assert result["episodes"] == 3 and result["lr"] in (0.0, 1e-3)
  assert result["lr_search"] == pytest.approx(
      {str(lr): np.mean(direct([0, 1], lr)) for lr in (0.0, 1e-3)}, abs=1e-9)
  mean, ci = fewshot.mean_ci(direct([2, 3, 4], result["lr"]))
  assert (result["accuracy"], result["ci95"]) == pytest.approx((mean, ci), abs=1e-9)

  # A given lr skips the search and reports the same episodes.
  calls.clear()
  fixed = finetune.evaluate_source(model, finetune.Full(), source, 3, SEED, FT_GLYPHS, lr=1e-3)
  assert calls == [([2, 3, 4], {1e-3})] and fixed["lr"] == 1e-3 and fixed["lr_search"] is None
  mean, ci = fewshot.mean_ci(direct([2, 3, 4], 1e-3))
  assert (fixed["accuracy"], fixed["ci95"]) == pytest.approx((mean, ci), abs=1e-9)


def test_same_seed_gives_the_same_episodes_for_every_method_and_mode(glyphs_data_dir, monkeypatch,
                                                                     cheap_library):
  """Fine-tuned θ and θ', zero-shot θ (through `fewshot`), zero-shot SMAT (through
  `metatrain.evaluate`) and sparse-tuned SMAT all report stream episodes 2, 3, 4 (after the
  reserve), each with the same adaptation key; SMAT at lr 0 is SMAT zero-shot."""
  data_dir, _, _ = glyphs_data_dir
  groups = {"glyphs:ood": load_domains("glyphs:ood", str(data_dir))}
  expected = [glyph_source(data_dir, first=2).episode(i) for i in range(3)]
  reserved = glyph_source(data_dir).episode(0)
  assert not np.array_equal(expected[0].support_images, reserved.support_images)
  protocol = evaluate.Protocol(SAMPLER, CFG.image_size, 3, SEED,
                               reserved=FT_GLYPHS.search_episodes)
  run = lambda model, adapt, lr=None: evaluate.evaluate(
      model, groups, protocol, adapt, FT_GLYPHS, lr, batch_size=1, progress=False)["glyphs:ood"]

  seen = []
  monkeypatch.setattr(finetune, "finetune_batch", recorder(
      seen, finetune.finetune_batch, lambda model, episodes, keys, lrs, **_: (
          episodes.support_images[0], episodes.query_images[0],
          np.asarray(jax.random.key_data(keys[0])))))

  def assert_reported(calls):
    assert len(calls) == 3
    for i, (support, query, key) in enumerate(calls):
      np.testing.assert_array_equal(support, expected[i].support_images)
      np.testing.assert_array_equal(query, expected[i].query_images)
      np.testing.assert_array_equal(key, jax.random.key_data(finetune.episode_key(SEED, 2 + i)))

  for params in (theta(0), theta(1)):
    seen.clear()
    assert run((params, CFG), "full")["episodes"] == 3
    assert len(seen) == 2 * 2 + 3  # two lrs × two search episodes, then the reported ones
    assert_reported(seen[-3:])

  sources = []
  for name in ("zero_shot", "cached_zero_shot"):
    monkeypatch.setattr(fewshot, name, recorder(sources, getattr(fewshot, name),
                                                lambda p, c, source, *_, **__: source))
  assert run((theta(0), CFG), "zero-shot")["episodes"] == 3
  assert len(sources) == 1 and sources[0].first == 2
  for i in range(3):
    np.testing.assert_array_equal(sources[0].episode(i).query_images, expected[i].query_images)

  theta_pre, params, router_state = smat_model()
  smat_run = metatrain.Run(SMAT_HP, theta_pre, params, router_state, tasks_seen=0)
  batches, real_evaluate = [], metatrain.evaluate

  def record_evaluate(model, iterator, progress=None):
    batches.extend(iterator)
    return real_evaluate(model, iter(batches), progress)

  monkeypatch.setattr(metatrain, "evaluate", record_evaluate)
  zero_shot = run(smat_run, "zero-shot")
  assert zero_shot["episodes"] == 3
  np.testing.assert_array_equal(np.concatenate([b.support_images for b in batches]),
                                np.stack([e.support_images for e in expected]))
  seen.clear()
  tuned = run(smat_run, "sparse", lr=0.0)
  assert_reported(seen)
  assert tuned["lr"] == 0.0 and tuned["lr_search"] is None
  # Per episode, sparse fine-tuning at lr 0 (no steps) is SMAT's zero-shot prediction.
  model = finetune.TaskModel(theta_pre, params, router_state, smat_run.temperature)
  no_steps = dataclasses.replace(FT_GLYPHS, steps=0)
  accuracies = [float(_finetune_batch(
      model, ep.stack([e]), finetune.episode_key(SEED, 2 + i)[None], jnp.zeros(1),
      adapter=finetune.Sparse(), hp=SMAT_HP, config=CFG, ft=no_steps)[0][0])
                for i, e in enumerate(expected)]
  zero_shot_accuracies, _ = _zero_shot_batch(params, router_state, ep.stack(expected), theta_pre,
                                             smat_run.temperature, hp=SMAT_HP)
  np.testing.assert_array_equal(accuracies, np.asarray(zero_shot_accuracies))
  assert tuned["accuracy"] == pytest.approx(100 * np.mean(accuracies), abs=1e-4)
  # (The zero-shot route scales float32 accuracies by 100 in float32: equal up to rounding.)
  assert tuned["accuracy"] == pytest.approx(zero_shot["accuracy"], abs=1e-4)


# ----------------------------------------------------------------------------- CLI


def _evaluate(data_dir, backbone, out, adapt):
  return cli.main(["evaluate", "--method", "pre", "--backbone", backbone,
                   "--domains", "glyphs:id,glyphs:ood", "--id-domains", "glyphs:id",
                   "--ways", "3", "--shots", "1", "--queries", "1", "--episodes", "2",
                   "--adapt", adapt, "--finetune-steps", "1", "--lrs", "0,1e-3",
                   "--lr-search-episodes", "2", "--seed", str(SEED), "--data-dir",
                   str(data_dir), "--out", str(out)])


def test_cli_writes_the_finetuned_schema(glyphs_data_dir, backbone, tmp_path, capsys,
                                         cheap_library):
  """`--adapt full`: the fine-tuning settings, the reserve and the per-domain lr are recorded,
  and the numbers are the library's; `--adapt sparse` on a frozen backbone is a clean error."""
  data_dir, _, _ = glyphs_data_dir
  assert _evaluate(data_dir, backbone, tmp_path / "r.json", "full") == 0
  result = json.loads((tmp_path / "r.json").read_text())
  assert result["adapt"] == "full" and result["reserved_episodes"] == 2
  assert result["finetune"]["steps"] == 1 and result["finetune"]["lrs"] == [0.0, 1e-3]
  assert result["finetune"]["search_episodes"] == 2
  for spec in ("glyphs:id", "glyphs:ood"):
    row = result["domains"][spec]
    assert row["episodes"] == 2 and row["lr"] in (0.0, 1e-3)
    assert set(row["lr_search"]) == {"0.0", "0.001"}
    expected = finetune.evaluate_source(checkpoint.load(backbone), finetune.Full(),
                                        glyph_source(data_dir, spec), 2, SEED, FT_GLYPHS)
    assert row["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert row["ci95"] == pytest.approx(expected["ci95"], abs=1e-9)
    assert row["lr"] == expected["lr"] and row["lr_search"] == pytest.approx(
        expected["lr_search"])
  assert "| lr |" in capsys.readouterr().out

  assert _evaluate(data_dir, backbone, tmp_path / "s.json", "sparse") == 2
  assert "SMAT" in capsys.readouterr().err
