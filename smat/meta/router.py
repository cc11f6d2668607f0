"""The task router: which experts a task interpolates, from its support set.

  tokens  = [p_1 … p_C, s_1 … s_4]    class prototypes of the frozen θ_pre + 4 learned skill tokens
  e       = Block(tokens)[0]          one pre-LN transformer block (4 heads, MLP ratio 2, no qkv
                                      bias, LayerNorm eps 1e-5), spectral-normalised dense layers
  ℓ       = K e                       K [M, D] learned expert keys
  s       = RelaxedBernoulli(T, ℓ) (training) or sigmoid(ℓ / T) (evaluation)
  α       = s / (Σ s + 1e-8)
with T = max(floor, start − tasks_seen / decay_tasks). Padded classes are masked out of the
attention, so they change nothing.

Spectral normalisation keeps (u, v) power-iteration vectors per dense layer as router state; a
training step runs one power iteration (as torch's `spectral_norm` does per forward) and
evaluation reuses the stored vectors. The gradient flows through σ = uᵀ W v with u, v fixed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NUM_SKILLS = 4
NUM_HEADS = 4
MLP_RATIO = 2
LAYER_NORM_EPS = 1e-5
SPECTRAL_LAYERS = ("qkv", "proj", "fc1", "fc2")
INIT_POWER_ITERATIONS = 15


def _linear(key, fan_in: int, fan_out: int, bias: bool = True) -> dict:
  """torch.nn.Linear's default init: U(±1/√fan_in) for kernel and bias; kernel [in, out]."""
  bound = 1.0 / math.sqrt(fan_in)
  k_w, k_b = jax.random.split(key)
  layer = {"kernel": jax.random.uniform(k_w, (fan_in, fan_out), minval=-bound, maxval=bound)}
  if bias:
    layer["bias"] = jax.random.uniform(k_b, (fan_out,), minval=-bound, maxval=bound)
  return layer


def init(key: jax.Array, dim: int, num_experts: int) -> tuple[dict, dict]:
  """(params, spectral state). Keys ~ kaiming normal N(0, 2/D), skill tokens N(0, 1e-3²)."""
  ks = jax.random.split(key, 8)
  hidden = MLP_RATIO * dim
  params = {
      "norm1": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
      "qkv": _linear(ks[0], dim, 3 * dim, bias=False),
      "proj": _linear(ks[1], dim, dim),
      "norm2": {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))},
      "fc1": _linear(ks[2], dim, hidden),
      "fc2": _linear(ks[3], hidden, dim),
      "skills": 1e-3 * jax.random.normal(ks[4], (NUM_SKILLS, dim)),
      "keys": math.sqrt(2.0 / dim) * jax.random.normal(ks[5], (num_experts, dim)),
  }
  unit = lambda k, n: (lambda x: x / jnp.linalg.norm(x))(jax.random.normal(k, (n,)))
  state = {}
  for i, name in enumerate(SPECTRAL_LAYERS):
    fan_in, fan_out = params[name]["kernel"].shape
    ku, kv = jax.random.split(jax.random.fold_in(ks[6], i))
    state[name] = {"u": unit(ku, fan_out), "v": unit(kv, fan_in)}
  for _ in range(INIT_POWER_ITERATIONS):  # σ estimates are usable before the first update
    state = power_iteration(params, state)
  return params, state


def power_iteration(params: dict, state: dict) -> dict:
  """One power iteration per spectral layer (no gradient): the new (u, v)."""
  def step(kernel, uv):
    kernel = jax.lax.stop_gradient(kernel)
    v = kernel @ uv["u"]
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
    u = kernel.T @ v
    return {"u": u / jnp.maximum(jnp.linalg.norm(u), 1e-12), "v": v}

  return {name: step(params[name]["kernel"], state[name]) for name in SPECTRAL_LAYERS}


def spectral_normalize(params: dict, state: dict) -> dict:
  """Kernels divided by σ = vᵀ K u (u, v from `state`, held fixed for the gradient)."""
  out = dict(params)
  for name in SPECTRAL_LAYERS:
    kernel, uv = params[name]["kernel"], jax.lax.stop_gradient(state[name])
    sigma = uv["v"] @ kernel @ uv["u"]
    out[name] = {**params[name], "kernel": kernel / sigma}
  return out


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + LAYER_NORM_EPS) * p["scale"] + p["bias"]


def _dense(x, p):
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def block(params: dict, tokens: jax.Array, valid: jax.Array) -> jax.Array:
  """Pre-LN transformer block on [N, D] tokens; invalid tokens are never attended to."""
  n, dim = tokens.shape
  head_dim = dim // NUM_HEADS
  qkv = _dense(_layer_norm(tokens, params["norm1"]), params["qkv"])
  q, k, v = jnp.split(qkv.reshape(n, 3, NUM_HEADS, head_dim).transpose(1, 2, 0, 3), 3)
  scores = (q[0] @ k[0].transpose(0, 2, 1)) * head_dim ** -0.5  # [H, N, N]
  scores = jnp.where(valid[None, None, :], scores, -1e9)
  attended = (jax.nn.softmax(scores, -1) @ v[0]).transpose(1, 0, 2).reshape(n, dim)
  x = tokens + _dense(attended, params["proj"])
  hidden = jax.nn.gelu(_dense(_layer_norm(x, params["norm2"]), params["fc1"]), approximate=False)
  return x + _dense(hidden, params["fc2"])


def expert_logits(params: dict, prototypes: jax.Array, class_mask: jax.Array) -> jax.Array:
  """ℓ [M] from the (spectral-normalised) router params and a task's prototypes [W, D]."""
  tokens = jnp.concatenate([prototypes, params["skills"]], 0)
  valid = jnp.concatenate([class_mask, jnp.ones((NUM_SKILLS,), bool)])
  embedding = block(params, tokens, valid)[0]
  return params["keys"] @ embedding


def temperature(tasks_seen, start: float = 5.0, floor: float = 0.5,
                decay_tasks: float = 4000.0) -> jax.Array:
  """T_sel = max(floor, start − tasks_seen / decay_tasks): counted in tasks, not steps."""
  return jnp.maximum(floor, start - jnp.asarray(tasks_seen, jnp.float32) / decay_tasks)


def scores(logits: jax.Array, temp, key: jax.Array | None = None) -> jax.Array:
  """RelaxedBernoulli(T, ℓ) sample (reparameterised) with a key; sigmoid(ℓ / T) without."""
  if key is None:
    return jax.nn.sigmoid(logits / temp)
  u = jnp.clip(jax.random.uniform(key, logits.shape), 1e-6, 1.0 - 1e-6)
  return jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temp)


def interpolation_weights(s: jax.Array) -> jax.Array:
  """α = s / (Σ s + 1e-8): non-negative, sums to 1 (one expert: α = s, as in the paper)."""
  return s / (s.sum() + 1e-8) if s.shape[0] > 1 else s
