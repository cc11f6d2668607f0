"""Sparsity strategies (smat/sparsity): budgets, schedules and each score against a hand
computation; the strategies as stand-alone sparse fine-tuning at meta-test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import cli, finetune, sparsity
from smat.data import episodes as ep
from smat.sparsity import common
from smat.models import vit

TREE = {"a": jnp.asarray([[-2.0, 1.0, 0.0], [1.0, 2.0, 3.0]]),
        "b": {"c": jnp.asarray([5.0, -7.0, 0.5])}}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def nonzero(tree) -> int:
  return int(sum((x != 0).sum() for x in leaves(tree)))


# ----------------------------------------------------------------------------------------------
# The shared contract.


def test_top_k_is_one_global_threshold_with_exact_count_and_ties_to_the_earlier_entry():
  mask = common.top_k_mask(jax.tree.map(jnp.abs, TREE), 4)
  # |values| 7, 5, 3, then the tie 2 (a[0,0] before a[1,1]): exactly four ones.
  np.testing.assert_array_equal(mask["a"], [[1, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(mask["b"]["c"], [1, 1, 0])
  for kept in range(10):
    assert nonzero(common.top_k_mask(TREE, kept)) == kept


def test_excluded_leaves_are_never_selected_and_the_budget_counts_every_entry():
  mask = common.top_k_mask(jax.tree.map(jnp.abs, TREE), 3, exclude=("b",))
  np.testing.assert_array_equal(mask["b"]["c"], [0, 0, 0])
  np.testing.assert_array_equal(mask["a"], [[1, 0, 0], [0, 1, 1]])
  assert common.kept_count(TREE, 1 / 3) == 3  # of 9 entries, excluded ones included
  with pytest.raises(ValueError, match="only 6 are eligible"):
    common.kept_count(TREE, 0.8, exclude=("b",))
  with pytest.raises(ValueError, match="1 − τ"):
    common.kept_count(TREE, 1.5)


def test_cubic_schedule_hits_its_endpoints_and_follows_the_formula():
  values = [float(common.cubic(t, 10, 30, 1.0, 0.1)) for t in range(40)]
  assert values[:11] == [1.0] * 11 and values[30:] == pytest.approx([0.1] * 10)
  assert values[20] == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
  assert all(a >= b for a, b in zip(values, values[1:]))
  counts = [int(common.scheduled_count(TREE, 1 / 3, t, 2, 6)) for t in range(8)]
  assert counts[:3] == [9, 9, 9] and counts[6:] == [3, 3]


def test_cli_offers_every_adapter():
  assert cli.ADAPT_MODES == ("zero-shot", *finetune.ADAPTERS)


# ----------------------------------------------------------------------------------------------
# Strategies.


def test_random_masks_meet_the_budget_and_are_reproducible_by_seed():
  params = {"w": jnp.zeros((40, 25)), "b": jnp.zeros((7,))}
  strategy = sparsity.Random(density=0.1)
  masks = [strategy.mask(strategy.init(params, jax.random.key(s))) for s in (0, 0, 1)]
  assert all(nonzero(m) == 101 for m in masks)  # round(0.1 · 1007)
  for a, b in zip(leaves(masks[0]), leaves(masks[1])):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(leaves(masks[0])[1], leaves(masks[2])[1])
  state = strategy.init(params, jax.random.key(0))
  assert strategy.update(state, params, params, 5) is state


def test_map_attention_explores_then_freezes_the_survivors():
  strategy = sparsity.MAP(density=1 / 3, start=1, end=3, every=1)
  update = jax.jit(strategy.update)
  state = strategy.init(TREE, None)
  masks = []
  for step in range(5):
    state = update(state, TREE, TREE, step)
    masks.append(strategy.mask(state))
  assert all(np.all(m == 1) for m in leaves(masks[0]))  # dense warm-up
  # Step 2: kept = round(3 + 6 · 0.5³) = 4 entries (7, 5, 3, 2); the rest get A = |δ| / max|δ|
  # of their own tensor.
  np.testing.assert_allclose(masks[2]["a"], [[1, 1 / 3, 0], [1 / 3, 2 / 3, 1]], rtol=1e-6)
  np.testing.assert_allclose(masks[2]["b"]["c"], [1, 1, 0.5 / 7], rtol=1e-6)
  for m in masks[3:]:  # exploitation: binary, exactly the budget
    np.testing.assert_array_equal(m["a"], [[0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(m["b"]["c"], [1, 1, 0])
  glob = sparsity.MAP(density=1 / 3, start=0, end=4, every=1, normalize="global")
  mask = glob.mask(glob.update(glob.init(TREE, None), TREE, TREE, 0))
  np.testing.assert_allclose(mask["a"], [[1, 1, 1], [1, 1, 1]])  # count is all at start
  attention = glob.attention(TREE)
  np.testing.assert_allclose(attention["a"], np.abs(np.asarray(TREE["a"])) / 7, rtol=1e-6)


def test_map_pruned_entries_act_and_learn_scaled_by_their_attention():
  """θ = base + sg(mask) ⊙ δ: forward uses A·δ on pruned entries, their gradient is A·g."""
  strategy = sparsity.MAP(density=1 / 3, start=0, end=10, every=1)
  state = strategy.update(strategy.init(TREE, None), TREE, TREE, 2)
  mask = strategy.mask(state)
  target = jax.tree.map(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape), TREE)

  def loss(delta):
    theta = jax.tree.map(lambda m, d: jax.lax.stop_gradient(m) * d, mask, delta)
    return sum(jnp.sum((t - x) ** 2) for t, x in zip(jax.tree.leaves(target),
                                                     jax.tree.leaves(theta)))

  grads = jax.grad(loss)(TREE)
  for g, m, d, t in zip(leaves(grads), leaves(mask), leaves(TREE), leaves(target)):
    np.testing.assert_allclose(g, -2 * (t - m * d) * m, rtol=1e-5, atol=1e-6)


def test_influence_score_is_the_first_order_change_of_reverting_an_entry():
  """|δ_i · ∂L/∂δ_i| ≈ |L(δ) − L(δ with entry i back at its base)| on a smooth loss."""
  rng = np.random.default_rng(0)
  base = jnp.asarray(rng.normal(size=6))
  delta = jnp.asarray(1e-3 * rng.normal(size=6))
  loss = lambda d: jnp.sum(jnp.sin(base + d) ** 2) + jnp.sum(base + d) ** 2
  grad = jax.grad(loss)(delta)
  for i in range(6):
    change = loss(delta) - loss(delta.at[i].set(0.0))
    assert abs(float(delta[i] * grad[i])) == pytest.approx(abs(float(change)), rel=1e-2)


def test_influence_importance_uncertainty_and_schedule_by_hand():
  params = {"w": jnp.asarray([1.0, -2.0, 3.0, 0.5, 0.0, 4.0])}
  early, late = np.asarray([1.0, 1.0, -1.0, 2.0, 9.0, 0.1]), np.asarray([500, 0, 0, 900, 0, 0.0])
  grads_at = lambda t: {"w": jnp.asarray(early * (t + 1) if t < 8 else late)}
  strategy = sparsity.Influence(density=2 / 6, start=2, end=6, window=2, beta1=0.85, beta2=0.95)
  update = jax.jit(strategy.update)
  state = strategy.init(params, None)
  importance, uncertainty, masks, scores = np.zeros(6), np.zeros(6), [], {}
  for t in range(10):
    state = update(state, params, grads_at(t), t)
    masks.append(np.asarray(strategy.mask(state)["w"]))
    if (t + 1) % 2 == 0:  # window end: mean I over the window, then the two EMAs
      influence = np.mean([np.abs(np.asarray(params["w"]) * np.asarray(grads_at(s)["w"]))
                           for s in (t - 1, t)], axis=0)
      importance = 0.85 * importance + 0.15 * influence
      uncertainty = 0.95 * uncertainty + 0.05 * np.abs(influence - importance)
      scores[t] = importance * uncertainty
      np.testing.assert_allclose(state.importance["w"], importance, rtol=1e-5)
      np.testing.assert_allclose(state.uncertainty["w"], uncertainty, rtol=1e-5)
  # Window ends 1, 3, 5, 7, 9; kept = round(2 + 4 (1 − (t − 2) / 4)³): 4 at t = 3, 2 at t = 5;
  # t = 7 is the first window end ≥ end (exactly the budget), after which the mask is frozen.
  assert [m.sum() for m in masks] == [6, 6, 6, 4, 4, 2, 2, 2, 2, 2]
  top = lambda score, k: np.isin(np.arange(6), np.argsort(-score, kind="stable")[:k])
  np.testing.assert_array_equal(masks[3], top(scores[3], 4))
  np.testing.assert_array_equal(masks[7], top(scores[7], 2))
  assert not np.array_equal(top(scores[9], 2), masks[7])  # the scores moved on, the mask not
  np.testing.assert_array_equal(masks[9], masks[7])


def test_influence_at_half_way_keeps_the_cubic_fraction():
  params = {"w": jnp.arange(1.0, 101.0)}
  strategy = sparsity.Influence(density=0.1, start=0, end=20, window=10)
  state = strategy.init(params, None)
  for t in range(10):
    state = strategy.update(state, params, params, t)
  kept = round(10 + 90 * (1 - 9 / 20) ** 3)
  assert nonzero(strategy.mask(state)) == kept
  np.testing.assert_array_equal(np.flatnonzero(strategy.mask(state)["w"]),
                                np.arange(100 - kept, 100))  # the largest |δ ⊙ g|


# ----------------------------------------------------------------------------------------------
# Stand-alone sparse fine-tuning at meta-test (the Strategic adapter).

CFG = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=16)
FT = finetune.FinetuneConfig(steps=6, lrs=(1e-2,), search_episodes=1)


def make_episode(seed: int) -> ep.Episode:
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(3), 2)
  return ep.Episode(
      support_images=rng.integers(0, 255, (6, 16, 16, 3), np.uint8), support_labels=labels.astype(np.int32),
      support_mask=np.ones(6, bool),
      query_images=rng.integers(0, 255, (6, 16, 16, 3), np.uint8), query_labels=labels.astype(np.int32),
      query_mask=np.ones(6, bool), class_mask=np.ones(3, bool), domain=np.asarray(0, np.int32))


def _adapter(name: str):
  if name == "circuit":
    return finetune.Circuit(strategy=sparsity.Circuit(density=0.2, every=2, group_size=8))
  fields = {"random": {}, "map": {"start": 1, "end": 4, "every": 1},
            "influence": {"start": 1, "end": 4, "window": 1}, "selfpruner": {"start": 2}}[name]
  return finetune.Strategic(strategy=sparsity.make(name, density=0.2, **fields))


@pytest.mark.parametrize("name", ["random", "map", "influence", "selfpruner", "circuit"])
def test_strategic_finetuning_moves_only_what_the_final_mask_keeps(name):
  adapter = _adapter(name)
  theta = vit.init(CFG, jax.random.key(0))
  episode = make_episode(1)

  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                 "xla_llvm_disable_expensive_passes": True})
  def run(theta, episode):
    delta, state, losses = finetune.adapt(adapter, theta, None, episode, jax.random.key(2),
                                          1e-2, CFG, FT)
    mask = adapter.mask(state)
    images = vit.preprocess(episode.query_images, CFG)
    f = adapter.features(theta, delta, state, images, None, CFG)
    masked = jax.tree.map(lambda p, m, d: p + m * d, theta, mask, delta)
    return delta, mask, losses, f, vit.forward(masked, images, CFG)

  delta, mask, losses, f, f_masked = run(theta, episode)
  assert nonzero(mask) == common.kept_count(theta, 0.2)
  assert set(np.unique(np.concatenate([m.ravel() for m in leaves(mask)]))) <= {0.0, 1.0}
  np.testing.assert_allclose(f, f_masked, rtol=1e-6)
  assert nonzero(delta) > 0 and np.all(np.isfinite(losses))
  if name == "random":  # the mask never changes, so nothing outside it ever moved
    assert all(not np.any(d[m == 0]) for d, m in zip(leaves(delta), leaves(mask)))
  if name == "circuit":  # only attention and MLP weight slices; rediscovered after step 2
    trainable = {"blocks/attn/query/kernel", "blocks/attn/query/bias", "blocks/attn/key/kernel",
                 "blocks/attn/key/bias", "blocks/attn/value/kernel", "blocks/attn/value/bias",
                 "blocks/attn/proj/kernel", "blocks/fc1/kernel", "blocks/fc1/bias",
                 "blocks/fc2/kernel"}
    for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]:
      name_ = "/".join(str(getattr(k, "key", k)) for k in path)
      assert name_ in trainable or not np.any(m), name_


# ----------------------------------------------------------------------------------------------
# Inside meta-training: each expert's strategy sees its own share of ∂L/∂δ.


def test_expert_gradient_shares_sum_to_the_delta_gradient_and_follow_alpha_and_mask():
  """With one task, ∂L/∂δ_k = α_k m_k ⊙ ∂L/∂θ: the shares divided by α_k agree wherever both
  experts keep an entry, vanish where an expert's mask is 0, and sum to ∂L/∂δ."""
  from smat.meta import step, tasks

  cfg = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=8)
  hp = tasks.Hyper.of(method="smat", vit=cfg, num_experts=2,
                   mask_strategy=sparsity.Random(density=0.5))
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3, dtype=np.int32), 2)
  image = lambda: rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  episode = ep.Episode(image(), labels, np.ones(6, bool), image(), labels, np.ones(6, bool),
                       np.ones(3, bool), np.asarray(0, np.int32))
  batch = ep.stack([episode])

  @jax.jit
  def shares(key):
    theta = vit.init(cfg, key)
    params, router_state = step.init_params(key, theta, hp)
    params["delta"] = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params["delta"])
    probe = jax.tree.map(jnp.zeros_like, params["masks"])
    keys = jax.random.split(key, 1)
    loss = lambda p, q: step._loss(p, q, router_state, theta, batch, keys, 1.0, hp)
    (g_params, g_probe), (metrics, _) = jax.grad(loss, (0, 1), has_aux=True)(params, probe)
    return g_params["delta"], g_probe, params["masks"], metrics["alpha"][0]

  g_delta, g_probe, masks, alpha = shares(jax.random.key(3))
  for d, q, m in zip(leaves(g_delta), leaves(g_probe), leaves(masks)):
    np.testing.assert_allclose(q.sum(0), d, rtol=1e-5, atol=1e-9)
    assert np.all(q[m == 0] == 0)
    both = (m[0] != 0) & (m[1] != 0)
    np.testing.assert_allclose(q[0][both] / alpha[0], q[1][both] / alpha[1], rtol=2e-4,
                               atol=1e-9)
  assert any(np.abs(q).max() > 0 for q in leaves(g_probe))


def test_circuit_rediscovery_in_meta_training_weights_each_task_by_its_alpha():
  """Expert k's circuit comes from Σ_t α_tk s_t / Σ_t α_tk, s_t the edge scores of task t at its
  zero-shot θ_task (current masks), and meets the budget exactly."""
  from smat.meta import methods, router, step, tasks
  from smat.sparsity import circuit

  cfg = vit.ViTConfig(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, image_size=16)
  strategy = sparsity.Circuit(density=0.2, every=2, group_size=8)
  hp = tasks.Hyper.of(method="smat", vit=cfg, num_experts=2, mask_strategy=strategy)
  batch = ep.stack([make_episode(4), make_episode(5)])
  key = jax.random.key(6)
  theta = vit.init(cfg, key)
  params, router_state = step.init_params(key, theta, hp)
  params["delta"] = jax.tree.map(lambda p: 0.05 * jnp.ones_like(p), params["delta"])
  half = sparsity.Random(0.5)  # masks under which θ_task depends on α
  params["masks"] = jax.vmap(lambda k: half.mask(half.init(params["delta"], k)))(
      jax.random.split(key, 2))
  got = jax.jit(lambda *args: methods.get(hp).rediscover(*args, 1.0))(params, router_state,
                                                                      theta, batch)

  router_params = router.spectral_normalize(params["router"], router_state)
  alphas, scores = [], []
  for t in range(2):
    episode = jax.tree.map(lambda x: x[t], batch)
    theta_t, alpha, _ = methods.zero_shot_task(params, theta, router_params, episode, hp, 1.0)
    alphas.append(np.asarray(alpha))
    scores.append(np.asarray(circuit.edge_scores(theta_t, episode, cfg, 8)))
  alphas, scores = np.stack(alphas), np.stack(scores)
  assert np.ptp(alphas[:, 0]) > 1e-4  # the two tasks are weighted differently
  kept = common.kept_count(theta, 0.2)
  for k in range(2):
    weighted = np.tensordot(alphas[:, k], scores, axes=1) / alphas[:, k].sum()
    want = circuit.circuit_mask(params["delta"], jnp.asarray(weighted), cfg, kept, 8)
    mine = jax.tree.map(lambda m: m[k], got)
    assert nonzero(mine) == kept
    for a, b in zip(leaves(mine), leaves(want)):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Self-Pruner: the repair step, the genetic search and per-block budgets.

from smat.sparsity import budgeted, evolution  # noqa: E402


def test_repair_keeps_the_weighted_mean_and_bounds_and_is_the_closest_such_vector():
  rng = np.random.default_rng(0)
  weights = np.asarray([1.0, 1.0, 2.0, 4.0, 1.0])
  for _ in range(20):
    rates = rng.normal(0.2, 0.4, 5)
    fixed = evolution.repair(rates, 0.1, 0.0, 0.5, weights)
    assert weights @ fixed / weights.sum() == pytest.approx(0.1, abs=1e-9)
    assert np.all(fixed >= 0.0) and np.all(fixed <= 0.5)
    inside = (fixed > 1e-12) & (fixed < 0.5 - 1e-12)  # KKT: one common shift off the bounds
    shifts = (fixed - rates)[inside]
    assert np.ptp(shifts) < 1e-9 if shifts.size else True
    np.testing.assert_allclose(evolution.repair(fixed, 0.1, 0.0, 0.5, weights), fixed,
                               atol=1e-9)  # idempotent
  with pytest.raises(ValueError, match="outside the bounds"):
    evolution.repair([0.1], 0.9, 0.0, 0.5)


def test_genetic_search_climbs_to_a_known_optimum_within_its_budget():
  target = evolution.repair(np.asarray([0.05, 0.3, 0.1, 0.15]), 0.15, 0.0, 1.0)
  calls = []

  def fitness(rates):
    calls.append(rates)
    assert abs(rates.mean() - 0.15) < 1e-9  # every candidate was repaired
    return -float(np.sum((rates - target) ** 2))

  result = evolution.search(fitness, 0.15, np.ones(4), seed=0)
  assert result["evaluations"] == len(calls) == 30 + 20 * 20
  assert all(a <= b for a, b in zip(result["history"], result["history"][1:]))
  assert result["fitness"] > 0.05 * result["history"][0]  # much closer than uniform
  np.testing.assert_allclose(result["rates"], target, atol=0.03)
  again = evolution.search(fitness, 0.15, np.ones(4), seed=0)
  assert again["rates"] == result["rates"]  # reproducible by seed


def test_self_pruner_budgets_are_exact_per_block_and_pick_the_largest_entries():
  params = {"blocks": {"w": jnp.asarray(np.arange(24.0).reshape(2, 3, 4)) - 11.5},
            "head": jnp.asarray([9.0, -30.0, 1.0, 2.0])}
  assert list(budgeted.group_sizes(params)) == [12, 12, 4]
  counts = budgeted.group_counts(params, 7 / 28, [0.1, 0.4, 0.25])
  assert list(counts) == [1, 5, 1] and counts.sum() == common.kept_count(params, 7 / 28)
  strategy = sparsity.SelfPruner(density=7 / 28, rates=(0.1, 0.4, 0.25), start=1)
  state = strategy.init(params, None)
  state = strategy.update(state, params, params, 0)
  assert nonzero(strategy.mask(state)) == 28  # dense warm-up
  state = strategy.update(state, params, params, 1)
  mask = strategy.mask(state)
  w = np.abs(np.asarray(params["blocks"]["w"]))
  assert mask["blocks"]["w"][0].sum() == 1 and mask["blocks"]["w"][0].ravel()[0] == 1  # |−11.5|
  assert mask["blocks"]["w"][1].sum() == 5
  np.testing.assert_array_equal(np.flatnonzero(mask["blocks"]["w"][1]),
                                np.sort(np.argsort(-w[1].ravel(), kind="stable")[:5]))
  np.testing.assert_array_equal(mask["head"], [0, 1, 0, 0])
  with pytest.raises(ValueError, match="3 groups"):
    sparsity.SelfPruner(density=0.25, rates=(0.5, 0.5)).counts(params)


def test_budget_fitness_is_the_accuracy_of_the_budgeted_delta():
  from smat import fewshot

  theta = vit.init(CFG, jax.random.key(0))
  delta = jax.tree.map(lambda p: 0.3 * jax.random.normal(jax.random.key(p.size), p.shape),
                       theta)
  batches = [ep.stack([make_episode(s) for s in (1, 2)])]
  sizes = budgeted.group_sizes(delta)
  dense = 100 * float(np.mean(fewshot.batch_accuracy(
      jax.tree.map(jnp.add, theta, delta), batches[0], CFG)))
  pre = 100 * float(np.mean(fewshot.batch_accuracy(theta, batches[0], CFG)))
  assert budgeted.budget_fitness(theta, delta, CFG, batches, 1.0)(np.ones(len(sizes))) == \
      pytest.approx(dense)
  assert budgeted.budget_fitness(theta, delta, CFG, batches, 0.0)(np.zeros(len(sizes))) == \
      pytest.approx(pre)
  rates = np.asarray([0.05, 0.5])
  counts = budgeted.group_counts(delta, 0.1, rates)
  mask = budgeted.grouped_top_k(jax.tree.map(jnp.abs, delta), counts)
  expected = 100 * float(np.mean(fewshot.batch_accuracy(
      jax.tree.map(lambda p, m, d: p + m * d, theta, mask, delta), batches[0], CFG)))
  assert budgeted.budget_fitness(theta, delta, CFG, batches, 0.1)(rates) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Circuit-tuning: edge attribution patching.

from smat.sparsity import circuit  # noqa: E402

TWO_BLOCKS = vit.ViTConfig(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32,
                           image_size=8)
GROUP = 8  # 4 MLP groups per block


@functools.cache
def _circuit_setup():
  params = vit.init(TWO_BLOCKS, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  labels = np.repeat(np.arange(3, dtype=np.int32), 2)
  episode = ep.Episode(images, labels, np.ones(6, bool), images, labels, np.ones(6, bool),
                       np.ones(3, bool), np.asarray(0, np.int32))
  return params, episode


def test_node_forward_is_the_backbone_with_its_writes_split_by_node():
  params, episode = _circuit_setup()
  x = vit.preprocess(jnp.asarray(episode.support_images), TWO_BLOCKS)
  inputs = circuit.zero_inputs(TWO_BLOCKS, 6, 5, GROUP)
  features, outputs = circuit.node_forward(params, x, TWO_BLOCKS, inputs, GROUP)
  np.testing.assert_allclose(features, vit.forward(params, x, TWO_BLOCKS), atol=1e-5)
  assert outputs["out"].shape == (2, 2, 6, 5, 16) and outputs["mlp"].shape == (2, 4, 6, 5, 16)


def test_edge_score_is_the_first_order_change_of_mean_ablating_that_edge():
  """Replacing u's write by its batch mean on v's input alone changes M by −⟨Δa_u, ∂M/∂in_v⟩
  to first order; the score is that inner product averaged over images and tokens."""
  params, episode = _circuit_setup()
  scores = np.asarray(circuit.edge_scores(params, episode, TWO_BLOCKS, GROUP))
  ups = circuit.upstream_nodes(TWO_BLOCKS, GROUP)
  downs = circuit.downstream_nodes(TWO_BLOCKS, GROUP)
  assert scores.shape == (len(ups), len(downs)) == (2 * 2 + 2 * 4, 3 * 2 * 2 + 2 * 4)
  assert np.all(scores[~circuit.edge_exists(TWO_BLOCKS, GROUP)] == 0)
  inputs = circuit.zero_inputs(TWO_BLOCKS, 6, 5, GROUP)
  metric = jax.jit(lambda i: circuit.support_metric(params, episode, TWO_BLOCKS, i, GROUP))
  base, outputs = metric(inputs)
  for u, v in [np.unravel_index(i, scores.shape) for i in np.argsort(-scores, None)[:3]]:
    kind_u, l_u, n_u = ups[u]
    kind_v, l_v, n_v = downs[v]
    write = outputs[kind_u][l_u, n_u]
    ablation = -(write - write.mean(0, keepdims=True))  # in_v gets mean(a_u) instead of a_u
    step = 1e-2
    patched = {**inputs, kind_v: inputs[kind_v].at[l_v, n_v].set(step * ablation)}
    change = (float(metric(patched)[0]) - float(base)) / step
    assert abs(change) / (6 * 5) == pytest.approx(scores[u, v], rel=0.05)


def test_node_weighting_and_the_circuit_mask_budget():
  params, episode = _circuit_setup()
  scores = np.asarray(circuit.edge_scores(params, episode, TWO_BLOCKS, GROUP))
  weighted = np.asarray(circuit.edge_scores(params, episode, TWO_BLOCKS, GROUP,
                                            node_weighted=True))
  np.testing.assert_allclose(weighted, scores * scores.sum(1, keepdims=True)
                             * scores.sum(0, keepdims=True), rtol=1e-5)
  u, v = np.unravel_index(np.argmax(scores), scores.shape)
  ups = circuit.upstream_nodes(TWO_BLOCKS, GROUP)
  downs = circuit.downstream_nodes(TWO_BLOCKS, GROUP)
  regions = (circuit.node_slices(ups[u], TWO_BLOCKS, GROUP)
             + circuit.node_slices(downs[v], TWO_BLOCKS, GROUP))
  named = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
                        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  size = sum(named(params)[name][index].size for name, index in regions)  # disjoint nodes
  jitted = jax.jit(circuit.circuit_mask, static_argnums=(2, 3, 4))
  for kept in (size, size + 37, 1000):
    mask = named(circuit.circuit_mask(params, scores, TWO_BLOCKS, kept, GROUP))
    for name, m in named(jitted(params, jnp.asarray(scores), TWO_BLOCKS, kept, GROUP)).items():
      np.testing.assert_array_equal(m, mask[name])
    assert sum(int(m.sum()) for m in mask.values()) == kept
    if kept >= size:  # the top edge's endpoints are whole
      assert all(np.all(mask[name][index] == 1) for name, index in regions)
    assert all(np.all(mask[name] == 0) for name in mask if not name.startswith(
        ("blocks/attn/query", "blocks/attn/key", "blocks/attn/value", "blocks/attn/proj/kernel",
         "blocks/fc1", "blocks/fc2/kernel")))
