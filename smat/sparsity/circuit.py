"""Circuit-tuning (Li, Yuan & Wang, arXiv 2502.06106): edge attribution patching over attention
heads and MLP neuron groups; the weight slices of the top edges' endpoints are what trains.

Graph of a ViT with L blocks, H heads and G = mlp_dim / group_size MLP groups per block:
  upstream nodes   head (l, h) writes o_h · W_proj[h rows] into the residual stream;
                   MLP group (l, g) writes gelu(u)[g] · W_fc2[g rows]
  downstream ends  the q, k and v inputs of every head and the input of every MLP group
  edges            u → v whenever u writes before v reads (earlier block, or the same block's
                   heads into its MLP), through the residual stream
Edge score (attribution patching with mean ablation, Δa_u = a_u − batch mean of a_u):
  s_uv = | mean over support images and tokens of ⟨Δa_u, ∂M/∂in_v⟩ |
where in_v is a copy of the residual stream read by v alone and M is the support
cross-entropy of the episode's ProtoNet classifier (prototypes from the same forward). It is the
first-order change of M when the edge u → v alone is mean-ablated. Optional node-weighted
rescoring: s'_uv = |s_uv| · Σ_j |s_uj| · Σ_i |s_iv|.
Trainable slices of an endpoint: upstream head → its rows of attn/proj; downstream head →
its columns (and bias) of query, key or value; MLP group → its fc1 columns and bias and fc2
rows. Edges are added in score order until the unfrozen parameter count reaches the budget
exactly (the last slice is cut to fit). Everything else — embeddings, LayerNorms, output
biases — stays frozen. Scores are gradient-and-activation based, so they are defined at δ = 0:
no warm-up is needed; the circuit is rediscovered every K steps by whoever holds the data.

`Circuit` is the sparsity-strategy form: its `update` keeps the mask (the scores need
activations, not (δ, ∂L/∂δ)), and `rediscover` turns scores into the next mask. The meta-trainer
calls it every K steps with each expert's α-weighted mean of its meta-batch's edge scores
(`smat.meta.step`), the meta-test adapter with the support's (`smat.finetune.Circuit`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from smat import protonet
from smat.models import layout, vit
from smat.sparsity import common

KINDS = ("q", "k", "v", "mlp")  # downstream ends; upstream kinds are "out" (heads) and "mlp"


def num_groups(config: vit.ViTConfig, group_size: int) -> int:
  if config.mlp_dim % group_size:
    raise ValueError(f"mlp_dim {config.mlp_dim} is not a multiple of group_size {group_size}")
  return config.mlp_dim // group_size


def zero_inputs(config: vit.ViTConfig, batch: int, tokens: int, group_size: int) -> dict:
  """Per-node additive perturbations of the residual stream each node reads: {q, k, v: [L, H,
  B, T, D], mlp: [L, G, B, T, D]} of zeros (their gradients are ∂M/∂in_v)."""
  shape = lambda n: (config.depth, n, batch, tokens, config.width)
  heads = {k: jnp.zeros(shape(config.num_heads)) for k in ("q", "k", "v")}
  return {**heads, "mlp": jnp.zeros(shape(num_groups(config, group_size)))}


def node_forward(params, images, config: vit.ViTConfig, inputs: dict, group_size: int):
  """(CLS features [B, D], node outputs {out: [L, H, B, T, D], mlp: [L, G, B, T, D]}) of
  `vit.forward` (float32), with `inputs[kind][l, n]` added to the stream node n reads."""
  vit.require_plain_blocks(config, "circuit masks")
  eps, head_dim = config.layer_norm_eps, config.width // config.num_heads
  num_groups(config, group_size)  # raises unless the groups tile the MLP
  x = layout.embed(params, images)
  outs, mlps = [], []
  for l in range(config.depth):
    p = layout.layer(params[layout.BLOCKS], l)
    read = lambda kind, norm: layout.layer_norm(x[None] + inputs[kind][l], p[norm], eps)
    reads = tuple(read(kind, layout.NORM1) for kind in ("q", "k", "v"))  # [H, B, T, D] each
    out = layout.attention(reads, p[layout.ATTN], head_dim, layout.per_node)
    x = x + out.sum(0) + p[layout.ATTN][layout.PROJ]["bias"]
    mlp = layout.mlp(read("mlp", layout.NORM2), p, group_size, layout.per_node)
    x = x + mlp.sum(0) + p[layout.FC2]["bias"]
    outs.append(out)
    mlps.append(mlp)
  return layout.features(x, params, eps), {"out": jnp.stack(outs), "mlp": jnp.stack(mlps)}


def support_metric(params, episode, config: vit.ViTConfig, inputs: dict, group_size: int,
                   cosine_scale: float = protonet.COSINE_SCALE):
  """(M = support cross-entropy of the episode's ProtoNet classifier, node outputs)."""
  images = vit.preprocess(episode.support_images, config)
  f, outputs = node_forward(params, images, config, inputs, group_size)
  protos = protonet.prototypes(f, episode.support_labels, episode.support_mask,
                               episode.class_mask.shape[-1])
  logits = protonet.cosine_logits(f, protos, episode.class_mask, cosine_scale)
  return protonet.cross_entropy(logits, episode.support_labels, episode.support_mask), outputs


def edge_scores(params, episode, config: vit.ViTConfig, group_size: int = 64,
                node_weighted: bool = False) -> jax.Array:
  """[U, V] edge scores; upstream order (out: l, h), then (mlp: l, g); downstream order q, k, v
  (l, h each), then mlp (l, g). Edges that do not exist (v reads before u writes) score 0."""
  batch, tokens = episode.support_images.shape[0], config.grid ** 2 + 1
  inputs = zero_inputs(config, batch, tokens, group_size)
  grads, outputs = jax.grad(
      lambda i: support_metric(params, episode, config, i, group_size), has_aux=True)(inputs)
  weight = episode.support_mask.astype(jnp.float32)[:, None, None]  # padded images excluded
  count = jnp.maximum(weight.sum(), 1.0)
  upstream = jnp.concatenate([outputs[k].reshape(-1, batch, tokens, config.width)
                              for k in ("out", "mlp")])
  ablated = upstream - (upstream * weight).sum(1, keepdims=True) / count
  downstream = jnp.concatenate([grads[k].reshape(-1, batch, tokens, config.width)
                                for k in KINDS])
  scores = jnp.abs(jnp.einsum("ubtd,vbtd->uv", ablated * weight, downstream)) / (count * tokens)
  scores = scores * jnp.asarray(edge_exists(config, group_size), scores.dtype)
  if node_weighted:
    scores = scores * scores.sum(1, keepdims=True) * scores.sum(0, keepdims=True)
  return scores


def upstream_nodes(config, group_size):
  return ([("out", l, h) for l in range(config.depth) for h in range(config.num_heads)]
          + [("mlp", l, g) for l in range(config.depth)
             for g in range(num_groups(config, group_size))])


def downstream_nodes(config, group_size):
  heads = [(kind, l, h) for kind in ("q", "k", "v") for l in range(config.depth)
           for h in range(config.num_heads)]
  return heads + [("mlp", l, g) for l in range(config.depth)
                  for g in range(num_groups(config, group_size))]


def edge_exists(config, group_size) -> np.ndarray:
  """[U, V] bool: u writes into the stream before v reads it."""
  ups, downs = upstream_nodes(config, group_size), downstream_nodes(config, group_size)
  before = lambda u, v: u[1] < v[1] or (u[1] == v[1] and u[0] == "out" and v[0] == "mlp")
  return np.asarray([[before(u, v) for v in downs] for u in ups])


def node_slices(node, config, group_size) -> list[tuple[str, tuple]]:
  """(leaf path, index) regions of the parameters a node's edge makes trainable."""
  kind, l, n = node
  dh = config.width // config.num_heads
  heads = slice(n * dh, (n + 1) * dh)
  group = slice(n * group_size, (n + 1) * group_size)
  every = slice(None)
  if kind == "out":
    return [(layout.block_path(layout.ATTN, layout.PROJ, "kernel"), (l, heads, every))]
  if kind in ("q", "k", "v"):
    name = layout.QKV["qkv".index(kind)]
    return [(layout.block_path(layout.ATTN, name, "kernel"), (l, every, heads)),
            (layout.block_path(layout.ATTN, name, "bias"), (l, heads))]
  return [(layout.block_path(layout.FC1, "kernel"), (l, every, group)),
          (layout.block_path(layout.FC1, "bias"), (l, group)),
          (layout.block_path(layout.FC2, "kernel"), (l, group, every))]


def _node_layout(params, config, group_size):
  """Static arrays for `circuit_mask`: per leaf, the node id of every entry (−1: none) and
  its position inside that node's region in flat order; the node keys; the node sizes."""
  keys = list(dict.fromkeys(upstream_nodes(config, group_size)
                            + downstream_nodes(config, group_size)))
  flat = layout.named_leaves(params)
  names = [n for n, _ in flat]
  node = {n: np.full(p.shape, -1, np.int32) for n, p in flat}
  position = {n: np.zeros(p.shape, np.int32) for n, p in flat}
  sizes = np.zeros(len(keys), np.int64)
  for i, key in enumerate(keys):
    for name, index in node_slices(key, config, group_size):
      shape = node[name][index].shape
      node[name][index] = i
      position[name][index] = sizes[i] + np.arange(int(np.prod(shape))).reshape(shape)
      sizes[i] += int(np.prod(shape))
  return names, node, position, keys, sizes


def circuit_mask(params, scores, config: vit.ViTConfig, kept: int, group_size: int = 64):
  """Float {0, 1} tree like `params`: edges taken in descending score order, each unfreezing
  its endpoints' slices, until exactly `kept` entries are trainable (the last node's region is
  cut in flat order to fit). Jittable: `scores` may be traced."""
  names, node, position, keys, sizes = _node_layout(params, config, group_size)
  index = {key: i for i, key in enumerate(keys)}
  ups = np.asarray([index[u] for u in upstream_nodes(config, group_size)])
  downs = np.asarray([index[v] for v in downstream_nodes(config, group_size)])
  rank = jnp.empty(scores.size, jnp.int32).at[jnp.argsort(-scores, axis=None, stable=True)].set(
      jnp.arange(scores.size, dtype=jnp.int32)).reshape(scores.shape)
  first = jnp.full(len(keys), scores.size, jnp.int32)  # the first edge reaching each node
  first = first.at[ups].min(rank.min(1)).at[downs].min(rank.min(0))
  order = jnp.argsort(first, stable=True)
  cumulative = jnp.cumsum(jnp.asarray(sizes)[order])
  taken_sorted = jnp.clip(kept - (cumulative - jnp.asarray(sizes)[order]), 0,
                          jnp.asarray(sizes)[order])
  taken = jnp.zeros(len(keys), taken_sorted.dtype).at[order].set(taken_sorted)
  leaves = [jnp.where(node[n] >= 0, position[n] < taken[np.maximum(node[n], 0)], False)
            .astype(jnp.float32) for n in names]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


@dataclasses.dataclass(frozen=True)
class Circuit:
  """Circuit-tuning as a mask strategy: the state is the current circuit mask (empty until the
  first `rediscover`, which both roles call before the first step, at δ = 0)."""

  density: float = 0.1
  every: int = 8  # K: steps between rediscoveries
  group_size: int = 64  # MLP hidden units per node
  node_weighted: bool = False
  exclude: tuple[str, ...] = ()  # circuits hold attention and MLP slices only: never excluded

  def init(self, params, key):
    del key
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def update(self, state, params, grads, step):
    del params, grads, step
    return state

  def mask(self, state):
    return state

  def scores(self, theta, episode, config: vit.ViTConfig) -> jax.Array:
    """[U, V] edge scores of `episode`'s support at parameters `theta`."""
    return edge_scores(theta, episode, config, self.group_size, self.node_weighted)

  def rediscover(self, params, scores, config: vit.ViTConfig):
    """The next state: the circuit of `scores` at exactly the budget (`params`: δ's shapes)."""
    return circuit_mask(params, scores, config, common.kept_count(params, self.density),
                        self.group_size)
