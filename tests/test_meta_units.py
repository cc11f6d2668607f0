"""Unit tests of the SMAT meta-training pieces (smat/meta/*) against hand-computed values.

Gates, expected L0, expert merging, the Lagrangian budget, the router, the first-order inner
step, distillation, gradient flow through the meta-batch loss, padding invariance and one jitted
`meta_train_step` per method. Every model is a one-block 16-wide ViT on 8-px images, and the
jitted functions are shared between tests (compilation dominates the run time).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smat.data import episodes as episodes_lib
from smat.data import augment
from smat.meta import budget, defaults, experts, gates, methods, router, schedules, step, tasks
from smat.models import vit

import cheap_compile

CFG = vit.ViTConfig(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, image_size=8)
M = 3  # experts
BETA, ZETA, GAMMA = 2.0 / 3.0, 1.1, -0.1


# ----------------------------------------------------------------------------- helpers

# XLA's cheapest CPU settings: these tests are dominated by compile time, not run time.
_CHEAP_COMPILE = cheap_compile.options()


def cheap_jit(fn):
  """`jax.jit(fn)` compiled ahead of time once per argument signature with `_CHEAP_COMPILE`."""
  jitted, compiled = jax.jit(fn), {}

  def call(*args):
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
    if signature not in compiled:
      compiled[signature] = jitted.lower(*args).compile(compiler_options=_CHEAP_COMPILE)
    return compiled[signature](*args)

  return call


@functools.cache
def theta_pre():
  return jax.jit(vit.init, static_argnums=0)(CFG, jax.random.key(0))


def hyper(method: str = "smat", **overrides) -> tasks.Hyper:
  return tasks.Hyper.of(method=method, vit=CFG, num_experts=M, **overrides)


def make_episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 2,
                 bucket=None) -> episodes_lib.Episode:
  """Random uint8 images, labels 0..ways-1 in class order, optionally padded to `bucket`."""
  rng = np.random.default_rng(seed)
  size = CFG.image_size
  image = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  labels = lambda n: np.repeat(np.arange(ways, dtype=np.int32), n)
  episode = episodes_lib.Episode(
      image(ways * shots), labels(shots), np.ones(ways * shots, bool),
      image(ways * queries), labels(queries), np.ones(ways * queries, bool),
      np.ones(ways, bool), np.asarray(0, np.int32))
  return episode if bucket is None else episodes_lib.pad(episode, bucket)


def meta_batch(seeds=(1, 2)) -> episodes_lib.Episode:
  return episodes_lib.stack([make_episode(s) for s in seeds])


def random_like(key, tree, scale: float):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_max_diff(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(max_diff(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if x.size)


def tree_max_abs(a) -> float:
  return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(a) if x.size)


def features(t, images):
  return vit.forward(t, vit.preprocess(jnp.asarray(images), CFG), CFG)


@functools.cache
def _power_iterations():
  return cheap_jit(lambda params, state: jax.lax.fori_loop(
      0, 300, lambda _, s: router.power_iteration(params, s), state))


@functools.cache
def smat_trainable():
  """smat params with a random δ (δ = 0 would zero the gate gradients), and a converged router
  state (the initial (u, v) are random: σ = vᵀKu from them is ≈ 0 or even negative)."""
  hp = hyper("smat")

  def build(key, theta):
    params, router_state = step.init_params(key, theta, hp)
    params = {**params, "delta": random_like(jax.random.fold_in(key, 1), params["delta"], 0.05)}
    return params, jax.lax.fori_loop(
        0, 300, lambda _, s: router.power_iteration(params["router"], s), router_state)

  return cheap_jit(build)(jax.random.key(0), theta_pre())


# ----------------------------------------------------------------------------- 1. gates


def hard_concrete_np(u, log_alpha):
  s = np_sigmoid((np.log(u) - np.log1p(-u) + log_alpha) / BETA)
  return np.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@pytest.mark.parametrize("width", [0.5, 0.2])
def test_gate_sample_matches_closed_form(width):
  key = jax.random.key(3)
  log_alpha = jnp.asarray(np.random.default_rng(0).normal(0, 2, (7, 5)), jnp.float32)
  u = jax.random.uniform(key, log_alpha.shape, jnp.float32, 0.5 - width, 0.5 + width)
  u = np.clip(np.asarray(u, np.float64), 1e-6, 1 - 1e-6)
  expected = hard_concrete_np(u, np.asarray(log_alpha, np.float64))
  z = gates.sample(key, log_alpha, width)
  np.testing.assert_allclose(np.asarray(z), expected, atol=2e-6)
  assert 0.0 < expected.mean() < 1.0  # a mix of values, not all clipped


def test_gate_deterministic_matches_closed_form_and_hits_0_and_1():
  la = np.array([-30.0, -3.0, -1.0, 0.0, 0.7, 2.0, 3.0, 30.0], np.float32)
  expected = np.clip(np_sigmoid(la) * 1.2 - 0.1, 0.0, 1.0)
  z = np.asarray(gates.deterministic(jnp.asarray(la)))
  np.testing.assert_allclose(z, expected, atol=1e-6)
  assert z[0] == 0.0 and z[1] == 0.0  # sigmoid(-3)·1.2 − 0.1 < 0: exactly zero
  assert z[-1] == 1.0 and z[-2] == 1.0  # sigmoid(3)·1.2 − 0.1 > 1: exactly one
  assert 0.0 < z[3] < 1.0 and z[3] == pytest.approx(0.5)


def test_gate_samples_are_exactly_0_and_1_with_positive_probability():
  extreme = gates.sample(jax.random.key(0), jnp.array([-50.0, 50.0] * 100))
  np.testing.assert_array_equal(np.asarray(extreme), np.array([0.0, 1.0] * 100, np.float32))
  z = np.asarray(gates.sample(jax.random.key(1), jnp.zeros((20000,))))
  # With log α = 0: P(z = 0) = P(z = 1) = 1 − sigmoid(β ln 11) ≈ 0.169.
  p_edge = 1.0 - np_sigmoid(BETA * math.log(11.0))
  assert abs((z == 0).mean() - p_edge) < 0.015
  assert abs((z == 1).mean() - p_edge) < 0.015
  assert ((z > 0) & (z < 1)).mean() > 0.5


def test_reference_noise_is_deterministic_with_temperature_beta():
  la = jnp.linspace(-4.0, 4.0, 41)
  expected = np.clip(np_sigmoid(np.asarray(la) / BETA) * 1.2 - 0.1, 0.0, 1.0)
  for seed in range(3):
    z = gates.sample(jax.random.key(seed), la, gates.REFERENCE_NOISE)
    np.testing.assert_allclose(np.asarray(z), expected, atol=2e-5)
  # ... which is not the evaluation gate (sigmoid(log α), no β).
  assert max_diff(gates.deterministic(la), expected) > 0.1


# ----------------------------------------------------------------------------- 2. expected L0


def test_prob_nonzero_closed_form_and_monte_carlo():
  la = np.array([-2.0, 0.0, 1.5], np.float32)
  p = np.asarray(gates.prob_nonzero(jnp.asarray(la)))
  np.testing.assert_allclose(p, np_sigmoid(la + BETA * math.log(11.0)), rtol=1e-5)
  draws = 100_000
  z = gates.sample(jax.random.key(7), jnp.repeat(jnp.asarray(la)[:, None], draws, 1))
  frequency = np.asarray((z != 0).mean(1))
  np.testing.assert_allclose(frequency, p, atol=0.01)


def _hand_expected_l0(gate_tree, params):
  """Element-weighted mean of P(z ≠ 0), each gate broadcast onto the elements it covers."""
  total, nonzero = 0, np.zeros(M)
  for g, p in zip(jax.tree.leaves(gate_tree), jax.tree.leaves(params)):
    total += p.size
    if g.size == 0:
      continue
    pnz = np_sigmoid(np.asarray(g) + BETA * math.log(11.0))
    nonzero += np.stack([np.broadcast_to(pnz[k], p.shape).sum() for k in range(M)])
  return nonzero / total


@pytest.mark.parametrize("structured,freeze", [(False, False), (True, False), (True, True)])
def test_expected_l0_is_element_weighted_mean(structured, freeze):
  theta = theta_pre()

  def gates_and_l0(key, th):
    g = experts.init_gates(key, th, M, structured=structured, freeze_embeddings=freeze, std=2.0)
    return g, experts.expected_l0(g, th)

  g, l0 = jax.device_get(cheap_jit(gates_and_l0)(jax.random.key(5), theta))
  query = g["blocks"]["attn"]["query"]["kernel"]
  patch = g["patch_embed"]["kernel"]
  if structured:
    assert query.shape == (M, 1, 16, 1)  # one gate per input column of [L, in, out]
    assert g["blocks"]["attn"]["query"]["bias"].shape == (M, 1, 16)
  else:
    assert query.shape == (M, 1, 16, 16)
  if freeze:
    assert patch.shape == (M, 0) and g["pos_embed"].shape == (M, 0)
    assert g["cls_token"].shape == (M, 0)
  elif structured:
    assert patch.shape == (M, 1, 1, 1, 16)  # one gate per output channel of the patch conv
  np.testing.assert_allclose(l0, _hand_expected_l0(g, theta), rtol=1e-5)
  if freeze:  # the embeddings are counted as zero: below the gated-only mean
    embeddings = sum(x.size for k in ("patch_embed", "cls_token", "pos_embed")
                     for x in jax.tree.leaves(theta[k]))
    assert embeddings > 0
    assert np.all(l0 <= 1.0 - embeddings / experts.total_size(theta) + 1e-6)


# ----------------------------------------------------------------------------- 3. experts


def _toy_params():
  """Backbone-like tree: a structured leaf [4, 3] (gates [M, 4, 1]), a per-element leaf [2, 5]
  and a leaf without gates [6]."""
  rng = np.random.default_rng(1)
  params = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32),
            "c": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  masks = {"a": jnp.asarray(rng.uniform(size=(M, 4, 1)), jnp.float32),
           "b": jnp.asarray(rng.uniform(size=(M, 2, 5)), jnp.float32),
           "c": jnp.zeros((M, 0))}
  return params, masks


def test_merge_and_interpolate_by_hand():
  params, masks = _toy_params()
  alpha = jnp.array([0.2, 0.5, 0.3])
  merged = experts.merge(alpha, masks)
  for name in ("a", "b"):
    hand = sum(float(alpha[k]) * np.asarray(masks[name][k]) for k in range(M))
    np.testing.assert_allclose(np.asarray(merged[name]), hand, rtol=1e-6)
  assert merged["c"].size == 0
  delta = random_like(jax.random.key(0), params, 1.0)
  theta = experts.interpolate(params, delta, merged)
  for name in ("a", "b"):
    hand = np.asarray(params[name]) + np.asarray(merged[name]) * np.asarray(delta[name])
    np.testing.assert_allclose(np.asarray(theta[name]), hand, rtol=1e-6, atol=1e-7)
  # Structured: row i of "a" moves by m[i] · δ[i, :].
  np.testing.assert_allclose(np.asarray(theta["a"] - params["a"])[2],
                             float(merged["a"][2, 0]) * np.asarray(delta["a"])[2], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(theta["c"]), np.asarray(params["c"]))  # no gates
  assert max_diff(theta["b"], params["b"]) > 0.01


def test_sparsity_counts_exact_zeros_weighted_by_coverage():
  params, masks = _toy_params()
  a = np.asarray(masks["a"]).copy()
  b = np.asarray(masks["b"]).copy()
  a[0, [0, 2], 0] = 0.0  # expert 0: 2 structured gates off → 6 elements
  b[0].flat[[1, 4, 7]] = 0.0  # 3 elements
  a[1] = 0.0  # expert 1: all of "a" (12)
  b[1].flat[0] = 1e-30  # tiny but not zero: counts as non-zero
  masks = {"a": jnp.asarray(a), "b": jnp.asarray(b), "c": masks["c"]}
  total = 12 + 10 + 6  # "c" has no gates: always sparse
  expected = np.array([(6 + 3 + 6) / total, (12 + 6) / total, 6 / total])
  np.testing.assert_allclose(np.asarray(experts.sparsity(masks, params)), expected, rtol=1e-6)
  merged = experts.merge(jnp.array([0.5, 0.5, 0.0]), masks)
  # m = 0 only where experts 0 and 1 are both 0: rows 0 and 2 of "a" (6 elements).
  np.testing.assert_allclose(float(experts.merged_density(merged, params)),
                             (12 - 6 + 10) / total, rtol=1e-6)


@pytest.mark.parametrize("width", [gates.FULL_NOISE, gates.REFERENCE_NOISE])
def test_fused_sample_and_merge_equals_sampling_then_merging(width):
  """`experts.sample_merged` recomputes z in its backward pass instead of storing it: the merged
  masks, the sparsity and the gradients (∂/∂log α and ∂/∂α through θ_task) must be those of
  `merge(sample_masks(...))`, on structured, element-wise and gate-less leaves."""
  params, _ = _toy_params()
  rng = np.random.default_rng(2)
  gate_logits = {"a": jnp.asarray(rng.normal(0, 2, (M, 4, 1)), jnp.float32),
                 "b": jnp.asarray(rng.normal(0, 2, (M, 2, 5)), jnp.float32),
                 "c": jnp.zeros((M, 0))}
  alpha = jnp.array([0.2, 0.5, 0.3])
  delta = random_like(jax.random.key(0), params, 1.0)
  key = jax.random.key(9)

  def loss(merged):
    theta = experts.interpolate(params, delta, merged)
    return sum(jnp.sum(jnp.sin(3.0 * x)) for x in jax.tree.leaves(theta))

  def unfused(gate_logits, alpha):
    masks = experts.sample_masks(key, gate_logits, width)
    return loss(experts.merge(alpha, masks)), experts.sparsity(masks, params)

  def fused(gate_logits, alpha):
    merged, sparsity = experts.sample_merged(key, gate_logits, alpha, params, width)
    return loss(merged), sparsity

  (want, want_sparsity), want_grads = jax.value_and_grad(unfused, (0, 1), has_aux=True)(
      gate_logits, alpha)
  (got, got_sparsity), got_grads = jax.value_and_grad(fused, (0, 1), has_aux=True)(
      gate_logits, alpha)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  np.testing.assert_allclose(np.asarray(got_sparsity), np.asarray(want_sparsity), rtol=1e-6)
  assert float(got_sparsity.min()) > 6 / 28  # some gates were clipped to 0, not only "c"'s
  assert tree_max_abs(want_grads[0]) > 0.1 and float(jnp.abs(want_grads[1]).max()) > 0.1
  assert tree_max_diff(got_grads, want_grads) < 1e-5 * tree_max_abs(want_grads)

  # ... and the gradient is the finite difference of the fused forward on an unclipped gate.
  z = np.asarray(gates.sample(jax.random.split(key, 3)[1], gate_logits["b"], width))
  k, i, j = np.argwhere((z > 0.05) & (z < 0.95))[0]
  bump = np.zeros((M, 2, 5), np.float32)
  bump[k, i, j] = 1e-2
  moved = lambda sign: float(fused({**gate_logits, "b": gate_logits["b"] + sign * bump},
                                   alpha)[0])
  assert (moved(1) - moved(-1)) / 2e-2 == pytest.approx(float(got_grads[0]["b"][k, i, j]),
                                                         rel=2e-2)


def test_fused_gates_keep_less_memory_and_the_same_gradients_on_a_vit_tree():
  """`benchmarks.gates` on ViT-mini's tree (0.8M weights, M = 2, 2 tasks): the fused gate path's
  compiled gradient needs well under the sampled one's temporary memory, with equal gradients.
  XLA realises the saving from jax 0.10.2 on (0.4.33–0.10.1 assign both the same buffers)."""
  from benchmarks import gates as gates_benchmark

  sampled, fused = gates_benchmark.measure("vit_mini_p4", 2, 2, repeats=1, noise=gates.FULL_NOISE)
  assert (sampled["implementation"], fused["implementation"]) == ("sampled", "fused")
  assert fused["max_gradient_difference"] < 1e-5
  version = tuple(int(x) for x in jax.__version__.split(".")[:3] if x.isdigit())
  if version >= (0, 10, 2):
    assert fused["temp_gib"] < 0.6 * sampled["temp_gib"]
  else:
    assert fused["temp_gib"] <= sampled["temp_gib"]


def test_compile_only_compiles_the_step_that_runs():
  """`benchmarks.throughput --compile-only` builds the state from shapes alone: its compiled step
  must be the one a real state compiles to (same FLOPs, arguments and temporaries), or the
  paper-scale memory table would describe another program."""
  from benchmarks import throughput
  from smat import config as config_lib

  config = config_lib.load("smat_glyphs:smoke", [])
  abstract = throughput.compile_only(config, 3, 3, 6, "vit_mini_p4")
  concrete = throughput._description(
      config, throughput._compile(config, 3, 3, 6, "vit_mini_p4"), 3, 3, 6, "vit_mini_p4")
  for key in ("flops_per_task", "plain_flops_per_task", "step_argument_gib", "step_temp_gib",
              "plain_temp_gib"):
    assert abstract[key] == pytest.approx(concrete[key], rel=1e-6), key
  assert abstract["flops_per_task"] > abstract["plain_flops_per_task"] > 0
  assert abstract["num_experts"] == 2 and abstract["step_argument_gib"] > 0


def test_soft_merge_by_hand():
  params, _ = _toy_params()
  deltas = random_like(jax.random.key(1), jax.tree.map(lambda p: jnp.zeros((M,) + p.shape),
                                                       params), 1.0)
  alpha = jnp.array([0.6, 0.1, 0.3])
  theta = experts.soft_merge(params, deltas, alpha)
  for name in params:
    hand = np.asarray(params[name]) + sum(float(alpha[k]) * np.asarray(deltas[name][k])
                                          for k in range(M))
    np.testing.assert_allclose(np.asarray(theta[name]), hand, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- 4. budget


def test_lagrangian_sgd_step_is_ascent_on_the_violation():
  alpha = jnp.array([0.5, 0.2, 0.3])
  lam = jnp.array([0.3, 0.0, 0.5])
  sparsity = jnp.array([0.5, 0.95, 0.89])
  tau, lr = 0.9, 2e-3
  grads = jax.grad(budget.lagrangian, (0, 1, 2))(alpha, lam, sparsity, tau)
  assert not np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[2]))
  opt = optax.sgd(lr)
  updates, _ = opt.update(grads[1], opt.init(lam))
  new = np.asarray(optax.apply_updates(lam, updates), np.float64)
  expected = np.asarray(lam) + lr * np.asarray(alpha) * (tau - np.asarray(sparsity))
  np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-9)
  assert new[0] > 0.3 and new[2] > 0.5  # denser than τ: λ grows
  assert new[1] < 0.0  # sparser than τ: the step alone goes negative (the train step resets
  # λ_k to 0 first and projects onto λ ≥ 0 after)


def test_budget_reset_zeros_satisfied_experts():
  lam = jnp.array([1.0, 2.0, 3.0, 4.0])
  sparsity = jnp.array([0.95, 0.5, 0.2, 0.99])
  np.testing.assert_array_equal(np.asarray(budget.reset(lam, sparsity, 0.9)), [0, 2, 3, 0])


def test_sparsity_loss_gradients_go_to_the_gates_only():
  params, _ = _toy_params()
  params = {"a": params["a"], "b": params["b"]}
  rng = np.random.default_rng(2)
  gate_logits = {"a": jnp.asarray(rng.normal(size=(M, 4, 1)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(M, 2, 5)), jnp.float32)}
  alpha = jnp.array([0.5, 0.2, 0.3])
  lam = jnp.array([0.7, 1.5, 0.0])
  tau = 0.9
  fn = lambda a, l, g: budget.sparsity_loss(a, l, experts.expected_l0(g, params), tau)
  g_alpha, g_lam, g_gates = jax.grad(fn, (0, 1, 2))(alpha, lam, gate_logits)
  assert not np.any(np.asarray(g_alpha)) and not np.any(np.asarray(g_lam))
  total = 12 + 10
  for name, coverage in (("a", 3), ("b", 1)):
    p = np_sigmoid(np.asarray(gate_logits[name]) + BETA * math.log(11.0))
    weight = (np.asarray(alpha) * np.asarray(lam)).reshape(M, *[1] * (p.ndim - 1))
    expected = weight * coverage * p * (1 - p) / total
    np.testing.assert_allclose(np.asarray(g_gates[name]), expected, rtol=1e-4, atol=1e-9)
  assert not np.any(np.asarray(g_gates["b"][2]))  # λ = 0: no pressure
  assert np.all(np.asarray(g_gates["b"][:2]) > 0)  # descending it lowers log α (sparser)


# ----------------------------------------------------------------------------- 5. router


@functools.cache
def router_init(num_experts: int = M):
  return router.init(jax.random.key(11), CFG.width, num_experts)


def test_interpolation_weights_sum_to_one():
  logits = jnp.array([1.5, -0.5, 0.2, -3.0])
  temp = 2.0
  s = router.scores(logits, temp)
  np.testing.assert_allclose(np.asarray(s), np_sigmoid(np.asarray(logits) / temp), rtol=1e-6)
  for key in (None, jax.random.key(0), jax.random.key(1)):
    alpha = np.asarray(router.interpolation_weights(router.scores(logits, temp, key)))
    assert np.all(alpha >= 0)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-6)
  key = jax.random.key(2)
  u = np.clip(np.asarray(jax.random.uniform(key, logits.shape), np.float64), 1e-6, 1 - 1e-6)
  relaxed = np_sigmoid((np.asarray(logits) + np.log(u) - np.log1p(-u)) / temp)
  np.testing.assert_allclose(np.asarray(router.scores(logits, temp, key)), relaxed, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(router.interpolation_weights(jnp.asarray(relaxed))),
                             relaxed / relaxed.sum(), rtol=1e-5)
  one = jnp.array([0.3])  # one expert: α = s, as in the paper
  assert float(router.interpolation_weights(one)[0]) == pytest.approx(0.3)


def test_router_temperature_schedule_counts_tasks():
  seen = np.array([0, 2000, 4000, 16000, 18000, 10**6])
  np.testing.assert_allclose(np.asarray(router.temperature(seen)),
                             [5.0, 4.5, 4.0, 1.0, 0.5, 0.5], rtol=1e-6)
  assert float(hyper().temperature(4000)) == pytest.approx(4.0)


def test_expert_logits_ignore_padded_classes():
  params, state = router_init()
  params = router.spectral_normalize(params, _power_iterations()(params, state))
  logits_of = cheap_jit(router.expert_logits)
  protos = jax.random.normal(jax.random.key(0), (3, CFG.width))
  logits = logits_of(params, protos, jnp.ones(3, bool))
  garbage = 100.0 * jax.random.normal(jax.random.key(1), (2, CFG.width))
  padded = logits_of(params, jnp.concatenate([protos, garbage]),
                     jnp.array([True, True, True, False, False]))
  assert logits.shape == (M,)
  np.testing.assert_allclose(np.asarray(padded), np.asarray(logits), atol=1e-5)
  # ... while the same tokens as valid classes do change them.
  unmasked = logits_of(params, jnp.concatenate([protos, garbage]), jnp.ones(5, bool))
  assert max_diff(unmasked, logits) > 1e-3


def test_spectral_normalisation_converges_to_unit_norm():
  params, state = router_init()
  raw = {n: np.linalg.svd(np.asarray(params[n]["kernel"]), compute_uv=False)[0]
         for n in router.SPECTRAL_LAYERS}
  assert max(abs(s - 1.0) for s in raw.values()) > 0.2, raw  # not unit norm to begin with
  normalised = router.spectral_normalize(params, _power_iterations()(params, state))
  for name in router.SPECTRAL_LAYERS:
    top = np.linalg.svd(np.asarray(normalised[name]["kernel"], np.float64), compute_uv=False)[0]
    assert top == pytest.approx(1.0, abs=1e-3), name
    np.testing.assert_allclose(np.asarray(normalised[name]["kernel"]),
                               np.asarray(params[name]["kernel"]) / raw[name], rtol=1e-3,
                               atol=1e-6)
  # The gradient flows through σ with (u, v) held fixed: none reaches the state.
  g_state = jax.grad(lambda st: router.spectral_normalize(params, st)["qkv"]["kernel"].sum())(
      state)
  assert tree_max_abs(g_state) == 0.0


# ----------------------------------------------------------------------------- 6. inner step

INNER_LR = 0.5
# Two valid classes in a 3-way bucket, 4 valid support images of 6, 4 valid queries of 5.
_PADDED_EPISODE = dict(seed=3, ways=2, shots=2, queries=2, bucket=(3, 6, 5))


def _hand_support_ce_from_features(f, protos, ep):
  """Support CE of ProtoNet over the valid rows and classes only (no masks involved)."""
  valid = np.asarray(ep.support_mask)
  ways = int(np.asarray(ep.class_mask).sum())
  labels = np.asarray(ep.support_labels)[valid]
  f = f[valid]
  fn = f / jnp.linalg.norm(f, axis=-1, keepdims=True)
  pn = protos[:ways] / jnp.linalg.norm(protos[:ways], axis=-1, keepdims=True)
  log_p = jax.nn.log_softmax(10.0 * fn @ pn.T)
  return -jnp.mean(log_p[np.arange(len(labels)), labels])


def _hand_prototypes(f, ep):
  valid = np.asarray(ep.support_mask)
  labels = np.asarray(ep.support_labels)
  ways = np.asarray(ep.class_mask).shape[0]
  rows = [f[valid & (labels == c)].mean(0) if np.any(valid & (labels == c))
          else jnp.zeros(f.shape[-1]) for c in range(ways)]
  return jnp.stack(rows)


@functools.cache
def _inner_step_results():
  """Everything the inner-step tests compare, from one compiled function of θ."""
  ep = make_episode(**_PADDED_EPISODE)
  hp = hyper(inner_lr=INNER_LR)
  projection = jax.random.normal(jax.random.key(9), (ep.query_images.shape[0], CFG.width))
  head_weights = jax.random.normal(jax.random.key(10), (3, CFG.width))
  query_fn = lambda t: jnp.sum(features(t, ep.query_images) * projection)

  def compute(theta):
    out = dict(zip(("adapted", "head", "ce", "accuracy"), tasks.inner_step(theta, ep, hp)))
    f_s = features(theta, ep.support_images)
    protos = _hand_prototypes(f_s, ep)
    hand_ce = lambda t: _hand_support_ce_from_features(features(t, ep.support_images),
                                                       jax.lax.stop_gradient(protos), ep)
    sgd = lambda t: jax.tree.map(lambda p, d: p - INNER_LR * d, t, jax.grad(hand_ce)(t))
    out.update(
        protos=protos, hand_ce=hand_ce(theta), expected_adapted=sgd(theta),
        g_head=jax.grad(_hand_support_ce_from_features, 1)(f_s, protos, ep),
        # d/dθ of a function of θ' only: ours, ∇f at θ', and the second-order alternative.
        ours=jax.grad(lambda t: query_fn(tasks.inner_step(t, ep, hp)[0]))(theta),
        direct=jax.grad(query_fn)(out["adapted"]),
        second_order=jax.grad(lambda t: query_fn(sgd(t)))(theta),
        head_grad=jax.grad(lambda t: jnp.sum(tasks.inner_step(t, ep, hp)[1] * head_weights))(
            theta),
        proto_grad=jax.grad(lambda t: jnp.sum(
            _hand_prototypes(features(t, ep.support_images), ep) * head_weights))(theta))
    return out

  return jax.device_get(cheap_jit(compute)(theta_pre()))


def test_inner_step_is_first_order_sgd_on_support_ce():
  r = _inner_step_results()
  theta = theta_pre()
  assert tree_max_diff(r["adapted"], r["expected_adapted"]) < 1e-5
  assert tree_max_diff(r["adapted"], theta) > 1e-3  # the step is not negligible
  assert float(r["ce"]) == pytest.approx(float(r["hand_ce"]), abs=1e-5)
  np.testing.assert_allclose(r["head"], r["protos"] - INNER_LR * r["g_head"], atol=1e-5)
  assert not np.any(r["head"][2])  # the padded class stays a zero prototype
  assert max_diff(r["head"], r["protos"]) > 1e-3
  assert float(r["accuracy"]) in (0.0, 0.25, 0.5, 0.75, 1.0)  # over the 4 valid rows


def test_inner_step_is_not_differentiated_through():
  r = _inner_step_results()
  error = tree_max_diff(r["ours"], r["direct"])
  assert error < 1e-4 * max(1.0, tree_max_abs(r["direct"]))
  # A second-order step would differ measurably, so the comparison above can fail.
  assert tree_max_diff(r["second_order"], r["direct"]) > 100 * error + 1e-3
  # The head's gradient flows through the prototypes of θ (straight-through re-attach).
  assert tree_max_abs(r["proto_grad"]) > 1e-3
  assert tree_max_diff(r["head_grad"], r["proto_grad"]) < 1e-5 * max(
      1.0, tree_max_abs(r["proto_grad"]))


# ----------------------------------------------------------------------------- 7. distillation


def _np_kl(p_logits, q_logits, t):
  log_p, log_q = np_log_softmax(p_logits / t), np_log_softmax(q_logits / t)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_distillation_directions_by_hand():
  rng = np.random.default_rng(4)
  student = rng.normal(0, 3, (5, 4)).astype(np.float32)
  teacher = rng.normal(0, 3, (5, 4)).astype(np.float32)
  student[4], teacher[4] = 1e4, -1e4  # a padded row with garbage
  mask = np.array([True, True, True, True, False])
  t = 2.0
  reverse = float(tasks.distillation(student, teacher, mask, hyper(kd_direction="reverse")))
  forward = float(tasks.distillation(student, teacher, mask, hyper(kd_direction="forward")))
  assert reverse == pytest.approx(t * t * _np_kl(student[:4], teacher[:4], t).mean(), rel=1e-5)
  assert forward == pytest.approx(t * t * _np_kl(teacher[:4], student[:4], t).mean(), rel=1e-5)
  assert abs(reverse - forward) > 1e-2
  assert float(tasks.kl_divergence(student, teacher, mask, t)) == pytest.approx(
      reverse / t ** 2, rel=1e-5)
  hp1 = hyper(kd_temperature=1.0)  # T = 1: plain KL
  assert float(tasks.distillation(student, teacher, mask, hp1)) == pytest.approx(
      _np_kl(student[:4], teacher[:4], 1.0).mean(), rel=1e-5)
  # Padded classes (−1e9 in both) change nothing.
  neg = np.full((5, 2), -1e9, np.float32)
  padded = float(tasks.distillation(np.concatenate([student, neg], 1),
                                    np.concatenate([teacher, neg], 1), mask, hyper()))
  assert padded == pytest.approx(reverse, rel=1e-5)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_distillation_gradient_reaches_the_student_only(direction):
  rng = np.random.default_rng(5)
  student = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  mask = jnp.array([True, True, False, True])
  hp = hyper(kd_direction=direction)
  g_s, g_t = jax.grad(tasks.distillation, (0, 1))(student, teacher, mask, hp)
  assert not np.any(np.asarray(g_t))
  assert not np.any(np.asarray(g_s)[2])  # padded row
  assert np.all(np.abs(np.asarray(g_s)[[0, 1, 3]]).sum(-1) > 1e-4)


# ----------------------------------------------------------------------------- 8. gradient flow


@functools.cache
def _loss_grad(hp):
  """value_and_grad of the smat meta-batch loss w.r.t. (params, θ_pre)."""
  fn = lambda params, rs, th, eps, keys, temp: step._loss(params, None, rs, th, eps, keys, temp,
                                                         hp)
  return cheap_jit(jax.value_and_grad(fn, (0, 2), has_aux=True))


def _run_loss_grad(params, router_state, batch, keys, hp=None):
  hp = hp or hyper("smat")
  return jax.device_get(_loss_grad(hp)(params, router_state, theta_pre(), batch, keys,
                                       hp.temperature(0)))


def test_meta_batch_loss_gradient_flow():
  hp = hyper("smat")
  params, router_state = smat_trainable()
  (loss, (metrics, batch)), (grads, _) = _run_loss_grad(
      params, router_state, meta_batch(), step._task_keys(jax.random.key(4), 2))
  assert np.isfinite(float(loss))
  for group in ("delta", "gates", "router", "lam"):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grads[group])), group
    assert tree_max_abs(grads[group]) > 0, group
  for name in ("keys", "skills", "qkv", "proj", "fc1", "fc2", "norm1"):  # every router part
    assert tree_max_abs(grads["router"][name]) > 0, name
  # λ's gradient while every expert's deterministic mask is denser than τ (log α ~ N(0, 0.5²):
  # no gate is below logit(1/12)): exactly ᾱ_k (sparsity_k − τ) < 0, so descent raises λ.
  sparsity, alpha = batch["expert_sparsity"], metrics["alpha"].mean(0)
  np.testing.assert_allclose(sparsity, jax.device_get(experts.sparsity(
      experts.eval_masks(params["gates"]), theta_pre())), atol=1e-7)
  assert np.all(sparsity < hp.experts.target_sparsity) and np.all(alpha > 0)
  np.testing.assert_allclose(grads["lam"], alpha * (sparsity - hp.experts.target_sparsity), rtol=1e-5)
  assert np.all(grads["lam"] < 0)


def test_lagrangian_measures_the_deterministic_masks_not_the_sampled_ones():
  """Gates at log α = −2: a sampled gate (full noise) is non-zero with probability
  σ(−2 + 1.599) ≈ 0.40, the deterministic one never (−2 < logit(1/12) ≈ −2.40 is false, so it
  is non-zero: z = 1.2 σ(−2) − 0.1 ≈ 0.043). The budget must read the deployed masks: sparsity 0
  and λ pushed up, whatever the sampled figure says."""
  hp = hyper("smat", gate_noise=gates.FULL_NOISE)
  params, router_state = smat_trainable()
  params = {**params, "gates": jax.tree.map(lambda g: jnp.full_like(g, -2.0), params["gates"])}
  (_, (metrics, batch)), (grads, _) = _run_loss_grad(
      params, router_state, meta_batch(), step._task_keys(jax.random.key(4), 2), hp)
  assert np.all(np.asarray(batch["expert_sparsity"]) == 0.0)
  sampled = np.asarray(metrics["sampled_sparsity"])
  assert np.all(sampled > 0.5)  # the sampled gates look sparse ...
  alpha = metrics["alpha"].mean(0)
  np.testing.assert_allclose(grads["lam"], alpha * (0.0 - hp.experts.target_sparsity), rtol=1e-5)
  # ... and at log α = −2.5 the deterministic gates are all 0 (sparsity 1 > τ: no pressure).
  params = {**params, "gates": jax.tree.map(lambda g: jnp.full_like(g, -2.5), params["gates"])}
  (_, (_, batch)), _ = _run_loss_grad(
      params, router_state, meta_batch(), step._task_keys(jax.random.key(4), 2), hp)
  assert np.all(np.asarray(batch["expert_sparsity"]) == 1.0)


def test_theta_pre_gets_gradient_only_through_the_task_parameters():
  """θ_pre is frozen: the router's and the pre-trained teacher's uses of it are detached.

  Checked on SMAT's task loss itself (the step wraps θ_pre in stop_gradient, which would
  hide a missing detachment). With θ_task = θ_pre + m ⊙ δ, ∂L/∂δ = m ⊙ ∂L/∂θ_task; if the
  router and the θ_pre teacher are detached, ∂L/∂θ_pre is exactly ∂L/∂θ_task, so
  ∂L/∂δ = m ⊙ ∂L/∂θ_pre. A gradient leaking through either adds a term that breaks it.
  """
  hp = hyper("smat")
  params, router_state = smat_trainable()
  router_params = router.spectral_normalize(params["router"], router_state)
  episode, key = make_episode(1), jax.random.key(4)

  def loss(delta, theta):
    return methods.get(hp).task_loss({**params, "delta": delta}, theta, router_params, episode,
                                     key, hp.temperature(0), None)

  (_, metrics), (g_delta, g_theta) = jax.device_get(cheap_jit(
      jax.value_and_grad(loss, (0, 1), has_aux=True))(params["delta"], theta_pre()))
  assert tree_max_abs(g_theta) > 1e-3

  def through_task(gate_logits, alpha, g):
    _, k_gates = jax.random.split(key)  # as tasks.expert_loss splits it (SMAT's task loss)
    merged = experts.merge(alpha, experts.sample_masks(k_gates, gate_logits, hp.experts.gate_noise))
    return jax.tree.map(lambda m, x: m * x, merged, g)

  expected = cheap_jit(through_task)(params["gates"], metrics["alpha"], g_theta)
  assert tree_max_diff(g_delta, expected) < 1e-5 * tree_max_abs(g_delta)
  assert tree_max_abs(g_delta) > 1e-3


def test_lambda_gradient_once_every_expert_is_sparse():
  hp = hyper("smat")
  params, router_state = smat_trainable()
  sparse = jax.tree.map(lambda g: jnp.full_like(g, gates.LOG_ALPHA_MIN), params["gates"])
  params = {**params, "gates": sparse, "lam": jnp.ones((M,))}
  (_, (metrics, batch_metrics)), (grads, _) = _run_loss_grad(
      params, router_state, meta_batch(), step._task_keys(jax.random.key(4), 2))
  sparsity, alpha = batch_metrics["expert_sparsity"], metrics["alpha"].mean(0)
  assert np.all(sparsity > hp.experts.target_sparsity) and np.all(alpha > 0)
  # L_lagr's gradient ᾱ (s − τ) > 0 (descent lowers λ; `reset` zeros it first in the step) ...
  np.testing.assert_allclose(grads["lam"], alpha * (sparsity - hp.experts.target_sparsity), rtol=1e-5)
  # ... and L_sparse uses the reset λ = 0, so it puts no pressure on the gates.
  assert float(batch_metrics["sparsity_loss"]) == 0.0


# ----------------------------------------------------------------------------- 9. padding


@functools.cache
def _zero_shot():
  """`step.zero_shot_batch` (vmapped `methods.zero_shot_accuracy`) at T = 5."""
  hp = hyper("smat")
  return cheap_jit(lambda params, router_state, episodes: step.zero_shot_batch(
      params, router_state, episodes, theta_pre(), hp.temperature(0), hp=hp))


def test_padded_episodes_give_the_same_loss_metrics_and_gradients():
  """The task loss (vmapped by `step._loss`, same keys) and `methods.zero_shot_accuracy`
  (vmapped by `step.zero_shot_batch`) on two episodes and on the same episodes padded to a larger
  bucket: the gate and router noise do not depend on the episode's shapes."""
  params, router_state = smat_trainable()
  plain = [make_episode(6), make_episode(7, ways=2, shots=3, queries=3)]
  bucket = (5, 9, 8)
  padded = [episodes_lib.pad(e, bucket) for e in plain]
  assert padded[0].shape_key == bucket and episodes_lib.stack(plain).shape_key == (3, 6, 6)
  keys = step._task_keys(jax.random.key(12), 2)
  (loss, (metrics, batch)), (grads, _) = _run_loss_grad(
      params, router_state, episodes_lib.stack(plain), keys)
  (loss_p, (metrics_p, batch_p)), (grads_p, _) = _run_loss_grad(
      params, router_state, episodes_lib.stack(padded), keys)
  assert float(loss_p) == pytest.approx(float(loss), abs=1e-5)
  assert metrics.keys() == metrics_p.keys() and batch.keys() == batch_p.keys()
  for name in metrics:
    np.testing.assert_allclose(metrics_p[name], metrics[name], atol=1e-5, err_msg=name)
  for name in batch:
    np.testing.assert_allclose(batch_p[name], batch[name], atol=1e-5, err_msg=name)
  assert np.all(metrics["kd"] > 1e-6) and np.all(metrics["query_ce"] > 0.1)
  assert tree_max_diff(grads_p, grads) < 1e-4 * max(1.0, tree_max_abs(grads))
  # Other keys give another loss, so the comparison above is not vacuous.
  other = _run_loss_grad(params, router_state, episodes_lib.stack(plain),
                         step._task_keys(jax.random.key(13), 2))[0][0]
  assert abs(float(other) - float(loss)) > 1e-5
  acc, alpha = _zero_shot()(params, router_state, episodes_lib.stack(plain))
  acc_p, alpha_p = _zero_shot()(params, router_state, episodes_lib.stack(padded))
  np.testing.assert_array_equal(np.asarray(acc_p), np.asarray(acc))
  np.testing.assert_allclose(np.asarray(alpha_p), np.asarray(alpha), atol=1e-6)
  np.testing.assert_allclose(np.asarray(alpha).sum(-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- 10. train step

EXPECTED_GROUPS = {"smat": {"delta", "gates", "lam", "router"},
                   "softmerge": {"delta", "router"}, "pmf": {"delta"}}


@functools.cache
def _train_step(method: str):
  """(hp, optimizer, meta_train_step jitted as `step.jit_step` does, without donation)."""
  hp = hyper(method)
  optim = defaults.base().optim
  optim.schedule, optim.warmup_epochs = "step", 0  # constant lr: each update reads off exactly
  optimizer = step.make_optimizer(optim, steps_per_epoch=1, total_steps=100)
  return hp, optimizer, cheap_jit(functools.partial(step.meta_train_step, hp=hp,
                                                    optimizer=optimizer))


@functools.cache
def _smat_state_fn():
  """(params, router state, λ, experts to make sparse [M] bool) → initial smat MetaState."""
  _, optimizer, _ = _train_step("smat")

  def build(params, router_state, lam, sparse):
    def force(g):  # log α = ln 0.01 everywhere: P(z ≠ 0) ≈ 0.047, sparser than τ = 0.9
      if not g.size:
        return g
      return jnp.where(sparse.reshape((M,) + (1,) * (g.ndim - 1)), gates.LOG_ALPHA_MIN, g)

    params = {**params, "lam": lam, "gates": jax.tree.map(force, params["gates"])}
    return step.init_state(params, router_state, optimizer)

  return cheap_jit(build)


def _initial_state(method: str):
  hp, optimizer, _ = _train_step(method)
  if method == "smat":
    return _smat_state_fn()(*smat_trainable(), jnp.full((M,), 0.5), jnp.zeros((M,), bool))

  def build(key, theta):
    params, router_state = step.init_params(key, theta, hp)
    if method == "softmerge":  # with δ = 0 the router would learn from its logit penalty only
      params = {**params, "delta": random_like(jax.random.fold_in(key, 1), params["delta"], 0.05)}
    return step.init_state(params, router_state, optimizer)

  return cheap_jit(build)(jax.random.key(0), theta_pre())


def _changed(new, old) -> bool:
  return any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


@pytest.mark.parametrize("method", ["smat", "softmerge", "pmf"])
def test_meta_train_step(method):
  hp, optimizer, train = _train_step(method)
  state = _initial_state(method)
  theta = theta_pre()
  batch = meta_batch()
  rng = jax.random.key(21)
  old = jax.device_get(state)

  state, summary = train(state, batch, rng, theta)
  assert set(state.params) == EXPECTED_GROUPS[method]
  assert jax.tree.structure(state.params) == jax.tree.structure(old.params)
  for group in EXPECTED_GROUPS[method]:
    assert _changed(state.params[group], old.params[group]), group
  assert int(state.step) == 1 and int(state.tasks_seen) == 2 and int(state.bad_step) == -1
  assert float(summary["finite"]) == 1.0
  assert float(summary["temperature"]) == pytest.approx(5.0)
  if method == "pmf":
    assert state.router_state == {}
  else:
    assert _changed(state.router_state, old.router_state)  # one power iteration
  if method == "smat":
    lam_old, lam_new = old.params["lam"], np.asarray(state.params["lam"])
    assert np.all(lam_new > lam_old)  # every expert is denser than τ: ascent
    assert np.all(lam_new - lam_old <= defaults.base().optim.lambda_lr * hp.experts.target_sparsity)
    flat = lambda tree: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
    g = flat(state.params["gates"])
    lo, hi = np.float32(gates.LOG_ALPHA_MIN), np.float32(gates.LOG_ALPHA_MAX)
    assert np.all(g >= lo) and np.all(g <= hi)
    assert np.any(g == lo)  # lr 1e6 drove gates far past ln 0.01: clamped
    assert max_diff(g, flat(old.params["gates"])) > 1.0

  # A non-finite loss (NaN in θ_pre) leaves the state as it was and records the step.
  good = jax.device_get(state)
  broken = {**theta, "norm": {**theta["norm"], "scale": theta["norm"]["scale"].at[0].set(
      jnp.nan)}}
  state, summary = train(state, batch, rng, broken)
  assert float(summary["finite"]) == 0.0
  assert int(state.bad_step) == 1 and int(state.step) == 2
  assert tree_max_diff(state.params, good.params) == 0.0
  assert tree_max_diff(state.opt_state, good.opt_state) == 0.0
  if method != "pmf":
    assert tree_max_diff(state.router_state, good.router_state) == 0.0
  # Another bad step and a good one keep the first bad step; the good one trains again.
  state, summary = train(state, batch, rng, broken)
  assert int(state.bad_step) == 1 and int(state.step) == 3
  assert tree_max_diff(state.params, good.params) == 0.0
  before = jax.device_get(state)
  state, summary = train(state, batch, rng, theta)
  assert float(summary["finite"]) == 1.0 and int(state.bad_step) == 1 and int(state.step) == 4
  assert _changed(state.params["delta"], before.params["delta"])
  assert float(summary["temperature"]) == pytest.approx(5.0 - int(before.tasks_seen) / 4000)


@pytest.mark.parametrize("method", ["smat", "pmf"])
def test_task_chunks_give_the_loss_and_gradients_of_all_tasks_at_once(method):
  """`train.task_chunks`: the meta-batch of 4 tasks run in 2 or 4 sequential chunks (each
  recomputed in the backward pass) gives the loss, metrics and gradients of running the 4 at
  once: chunking changes memory, never the update."""
  state = _initial_state(method)
  batch, theta = meta_batch((1, 2, 3, 4)), theta_pre()
  keys = step._task_keys(jax.random.key(23), 4)

  def loss_and_grads(chunks):
    hp = hyper(method, task_chunks=chunks)
    fn = jax.value_and_grad(step._loss, has_aux=True)
    return cheap_jit(lambda p: fn(p, None, state.router_state, theta, batch, keys,
                                  hp.temperature(0), hp))(state.params)

  (loss, (metrics, _)), grads = loss_and_grads(1)
  for chunks in (2, 4):
    (chunked_loss, (chunked_metrics, _)), chunked_grads = loss_and_grads(chunks)
    assert float(chunked_loss) == pytest.approx(float(loss), rel=1e-6)
    assert tree_max_diff(chunked_metrics, metrics) < 1e-5  # per task, in task order
    for group in grads:
      scale = max(max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads[group])), 1e-12)
      assert tree_max_diff(chunked_grads[group], grads[group]) < 1e-4 * scale, (chunks, group)


def test_meta_train_step_keeps_lambda_of_a_sparse_expert_at_zero():
  """λ_k of an expert already sparser than τ is reset and stays 0 after the λ step (the step
  alone would take it to −lr · ᾱ_k (sparsity_k − τ) < 0); the others grow."""
  hp, _, train = _train_step("smat")
  state = _smat_state_fn()(*smat_trainable(), jnp.ones((M,)), jnp.array([True, False, False]))
  state, summary = train(state, meta_batch(), jax.random.key(22), theta_pre())
  sparsity, lam = np.asarray(summary["expert_sparsity"]), np.asarray(state.params["lam"])
  assert sparsity[0] > hp.experts.target_sparsity and np.all(sparsity[1:] < hp.experts.target_sparsity)
  assert np.all(np.asarray(summary["alpha"]) > 0)
  assert lam[0] == 0.0
  assert np.all(lam[1:] > 1.0)
  np.testing.assert_array_equal(np.asarray(summary["lam"]), lam)


# ----------------------------------------------------------------------------- 11. the recipe


def test_epoch_multiplier_is_the_authors_warmup_cosine_per_epoch():
  """HF's cosine-with-warm-up at the epoch index, W = 5, H = 50: a 25-epoch run's last epoch
  (index 24) runs at ½ (1 + cos(π · 19 / 45)) ≈ 0.621 of the peak; past the horizon it is 0."""
  m = lambda e: float(schedules.epoch_multiplier(e, 5, 50))
  assert [m(e) for e in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
  assert m(24) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 45)), rel=1e-6)
  assert m(24) == pytest.approx(0.621, abs=1e-3)
  assert m(50) == pytest.approx(0.0, abs=1e-7) and m(70) == pytest.approx(0.0, abs=1e-7)


def test_epoch_schedule_steps_every_group_once_per_epoch():
  """The update each group takes per step, for a unit gradient: epoch 0 runs δ, the gates and
  λ at first_epoch_lr and the router at m(0) = 0; from then on lr × m(epoch), constant within
  an epoch (2 steps here)."""
  optim = defaults.base().optim
  optim.delta_momentum, optim.delta_weight_decay, optim.gate_clip = 0.0, 0.0, 1e9
  optimizer = step.make_optimizer(optim, steps_per_epoch=2, total_steps=20)
  params = {g: jnp.zeros(()) for g in ("delta", "gates", "lam")}
  params["router"] = {"w": jnp.zeros(())}
  grads = jax.tree.map(jnp.ones_like, params)
  opt_state, seen = optimizer.init(params), []
  for _ in range(8):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    seen.append({g: float(jax.tree.leaves(u)[0]) for g, u in updates.items()})
  peaks = {"delta": optim.delta_lr, "gates": optim.gate_lr, "lam": optim.lambda_lr}
  for i, update in enumerate(seen):
    epoch = i // 2
    m = float(schedules.epoch_multiplier(epoch, optim.warmup_epochs, optim.cosine_epochs))
    for group, peak in peaks.items():
      expected = optim.first_epoch_lr if epoch == 0 else peak * m
      assert update[group] == pytest.approx(-expected, rel=1e-5), (i, group)
    if epoch == 0:
      assert update["router"] == 0.0
    else:  # AdamW's first steps move by ≈ lr for a constant gradient
      assert -update["router"] == pytest.approx(optim.router_lr * m, rel=2e-2), i


def test_augmentation_draws_from_the_step_key_and_is_off_by_switch():
  """PMF's loss has no other randomness: with augmentation two keys give two losses (and two
  sets of images), without it the same loss; a padded batch augments its real images alike."""
  episodes, theta = meta_batch(), theta_pre()
  params = {"delta": experts.init_delta(theta)}
  on, off = hyper("pmf", augment=augment.AugmentConfig(flip_prob=0.0)), hyper("pmf")
  loss = {hp: [float(cheap_jit(functools.partial(
      lambda keys, hp: step._loss(params, None, {}, theta, episodes, keys, 1.0, hp)[0],
      hp=hp))(step._task_keys(jax.random.key(seed), 2))) for seed in (0, 1)] for hp in (on, off)}
  assert loss[off][0] == loss[off][1]
  assert loss[on][0] != loss[on][1]
  assert abs(loss[on][0] - loss[off][0]) > 1e-4  # augmented images are not the loaded ones

  episode = make_episode(3)
  view = jax.jit(tasks.augmented, static_argnums=2)
  a, b = view(episode, jax.random.key(0), on), view(episode, jax.random.key(1), on)
  assert not np.allclose(np.asarray(a.support_images), np.asarray(b.support_images))
  same = view(episode, jax.random.key(0), off)
  np.testing.assert_array_equal(np.asarray(same.support_images), episode.support_images)
  padded = view(episodes_lib.pad(episode, (5, 9, 8)), jax.random.key(0), on)
  np.testing.assert_allclose(np.asarray(padded.support_images)[:6],
                             np.asarray(a.support_images), atol=1e-6)


def test_zero_shot_accuracy_is_nan_when_theta_task_overflows():
  """A θ_task whose features overflow scores NaN (evaluation then errors), never chance."""
  hp = hyper("smat")
  params, router_state = smat_trainable()
  router_params = router.spectral_normalize(params["router"], router_state)
  episode = make_episode(2)
  accuracy = cheap_jit(lambda p: methods.zero_shot_accuracy(p, theta_pre(), router_params,
                                                            episode, hp, hp.temperature(0))[0])
  assert np.isfinite(float(accuracy(params)))
  huge = {**params, "delta": jax.tree.map(lambda d: d * 1e38 + 1e38, params["delta"])}
  assert np.isnan(float(accuracy(huge)))
