"""Backbone compression, Self-Pruner's second use: structured pruning of attention heads and MLP
channels of a (meta-tuned) ViT with per-layer keep rates, no retraining.

  scores  = unit_importance(θ, batches, config)        heads [L, H], channels [L, C]
  counts  = kept_counts(rates, config)                 heads and channels each layer keeps
  kept    = kept_units(scores, counts)                 the top units of each layer
  θ_zero  = zero_pruned(θ, kept)                       same shapes, pruned units silenced
  small   = prune(θ, kept, config)                     physically smaller per-layer weights
  f       = pruned_forward(small, images, config)      = vit.forward(θ_zero, images, config)

A unit's importance is the first-order change of the support cross-entropy M of an episode's
ProtoNet classifier when the unit's output is zeroed, |Σ W ⊙ ∂M/∂W| over the rows the unit
writes through (a head's rows of attn/proj, a channel's row of fc2: M is linear in a scale on
them), averaged over episodes. Zeroing those rows is exactly removing the unit, so accuracy is
measured on `zero_pruned` (one compiled evaluation for every candidate of the search) and speed
on `prune` (the shapes a deployed model would have). A layer's rate is the fraction of its
prunable parameters it keeps: round(rate · H) heads, and channels filling the rest;
`compression_fitness` scores rates for `evolution.search` with their mean fixed at 1 − the
target sparsity (layers are the same size).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from smat import fewshot, protonet
from smat.models import layout, vit
from smat.models.layout import ATTN, BLOCKS, FC1, FC2, NORM1, NORM2, PROJ, QKV


def support_loss(theta, episode, config: vit.ViTConfig):
  """M: support cross-entropy of the episode's ProtoNet classifier (prototypes from the same
  forward)."""
  f = vit.forward(theta, vit.preprocess(episode.support_images, config), config)
  protos = protonet.prototypes(f, episode.support_labels, episode.support_mask,
                               episode.class_mask.shape[-1])
  logits = protonet.cosine_logits(f, protos, episode.class_mask)
  return protonet.cross_entropy(logits, episode.support_labels, episode.support_mask)


def _unit_scores(theta, episode, config: vit.ViTConfig):
  grads = jax.grad(support_loss)(theta, episode, config)
  blocks, g = theta[BLOCKS], grads[BLOCKS]
  depth, heads = config.depth, config.num_heads
  proj = (blocks[ATTN][PROJ]["kernel"] * g[ATTN][PROJ]["kernel"]).reshape(
      depth, heads, -1).sum(-1)
  fc2 = (blocks[FC2]["kernel"] * g[FC2]["kernel"]).sum(-1)
  return jnp.abs(proj), jnp.abs(fc2)


def unit_importance(theta, batches, config: vit.ViTConfig) -> tuple[np.ndarray, np.ndarray]:
  """(heads [L, H], channels [L, C]): mean over the episodes of `batches` (stacked batches) of
  each unit's |first-order change of M when it is removed|."""
  scores = jax.jit(lambda t, e: jax.lax.map(lambda x: _unit_scores(t, x, config), e))
  heads, channels = [], []
  for batch in batches:
    h, c = scores(theta, batch)
    heads.append(np.asarray(h))
    channels.append(np.asarray(c))
  return np.concatenate(heads).mean(0), np.concatenate(channels).mean(0)


def unit_sizes(config: vit.ViTConfig) -> tuple[int, int]:
  """Parameters of one head (its q, k, v columns and biases, its proj rows) and of one MLP
  channel (its fc1 column and bias, its fc2 row)."""
  dh = config.width // config.num_heads
  return 3 * (config.width * dh + dh) + dh * config.width, 2 * config.width + 1


def kept_counts(rates, config: vit.ViTConfig):
  """(heads [L], channels [L]) a layer keeps at keep rate r: round(r · H) heads, then as many
  channels as bring the layer's prunable parameters nearest to r of them (heads are coarse: the
  channels absorb their rounding, so every layer keeps its rate of parameters to within one
  channel). Jittable in `rates`."""
  head, channel = unit_sizes(config)
  rates = jnp.asarray(rates, jnp.float32)
  heads = jnp.round(rates * config.num_heads)
  room = rates * (config.num_heads * head + config.mlp_dim * channel) - heads * head
  channels = jnp.clip(jnp.round(room / channel), 0, config.mlp_dim)
  return heads.astype(jnp.int32), channels.astype(jnp.int32)


def kept_units(scores, counts):
  """Bool [L, N]: the `counts[l]` highest-scoring units of each layer l (ties: the lower
  index). Jittable in `counts`."""
  scores = jnp.asarray(scores)
  count = jnp.asarray(counts)
  order = jnp.argsort(-scores, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)
  return rank < count[:, None]


def zero_pruned(theta, heads_kept, channels_kept, config: vit.ViTConfig):
  """θ with the output rows of removed heads (attn/proj) and channels (fc2) set to 0: the
  pruned model's function in the unpruned shapes."""
  blocks = theta[BLOCKS]
  dh = config.width // config.num_heads
  rows = jnp.repeat(jnp.asarray(heads_kept), dh, axis=1).astype(jnp.float32)  # [L, D]
  proj = {**blocks[ATTN][PROJ], "kernel": blocks[ATTN][PROJ]["kernel"] * rows[:, :, None]}
  fc2 = {**blocks[FC2], "kernel": blocks[FC2]["kernel"]
         * jnp.asarray(channels_kept, jnp.float32)[:, :, None]}
  return {**theta, BLOCKS: {**blocks, ATTN: {**blocks[ATTN], PROJ: proj}, FC2: fc2}}


def _columns(dense, index):
  """The dense layer's output units `index` (kernel columns and bias)."""
  return {"kernel": dense["kernel"][:, index], "bias": dense["bias"][index]}


def _rows(dense, index):
  """The dense layer's input units `index` (kernel rows; the bias is the output's)."""
  return {"kernel": dense["kernel"][index], "bias": dense["bias"]}


def prune(theta, heads_kept, channels_kept, config: vit.ViTConfig) -> dict:
  """Physically pruned parameters: θ's tree with its stacked blocks replaced by a list of
  layers (`layout.layer`'s trees) whose q/k/v columns, proj rows, fc1 columns and fc2 rows are
  those of their kept units."""
  dh = config.width // config.num_heads
  heads_kept, channels_kept = np.asarray(heads_kept), np.asarray(channels_kept)
  layers = []
  for l in range(config.depth):
    p = jax.tree.map(np.asarray, layout.layer(theta[BLOCKS], l))
    cols = (np.flatnonzero(heads_kept[l])[:, None] * dh + np.arange(dh)).ravel()
    units = np.flatnonzero(channels_kept[l])
    attn = {**{name: _columns(p[ATTN][name], cols) for name in QKV},
            PROJ: _rows(p[ATTN][PROJ], cols)}
    layers.append({NORM1: p[NORM1], NORM2: p[NORM2], ATTN: attn,
                   FC1: _columns(p[FC1], units), FC2: _rows(p[FC2], units)})
  shared = {k: v for k, v in theta.items() if k != BLOCKS}
  return jax.tree.map(jnp.asarray, {**shared, BLOCKS: layers})


def pruned_forward(pruned, images, config: vit.ViTConfig) -> jax.Array:
  """CLS features [B, D] of `prune`'s output on normalised images (layers unrolled: each has
  its own width)."""
  vit.require_plain_blocks(config, "structured compression")
  eps, dh = config.layer_norm_eps, config.width // config.num_heads
  x = layout.embed(pruned, images)
  for p in pruned[BLOCKS]:
    x = layout.block(x, p, eps, dh)
  return layout.features(x, pruned, eps)


def compression_fitness(theta, config: vit.ViTConfig, importance, batches):
  """Self-Pruner's fitness for use (b): per-layer keep rates → mean ProtoNet accuracy (%) on the
  fixed episode `batches` of the pruned model (no retraining)."""
  heads, channels = (jnp.asarray(s) for s in importance)

  @jax.jit  # θ is an argument: closed over, XLA would constant-fold the pruning
  def accuracy(theta, rates, episodes):
    head_counts, channel_counts = kept_counts(rates, config)
    pruned = zero_pruned(theta, kept_units(heads, head_counts),
                         kept_units(channels, channel_counts), config)
    return fewshot.batch_accuracy(pruned, episodes, config)

  def fitness(rates) -> float:
    rates = jnp.asarray(rates, jnp.float32)
    return 100.0 * float(np.mean(np.concatenate([
        np.asarray(accuracy(theta, rates, b)) for b in batches])))

  return fitness


def time_forwards(models: list, config: vit.ViTConfig, images, repeats: int = 20) -> list[float]:
  """Median seconds of one jitted `pruned_forward` of `images` for each of `prune`'s `models`,
  timed in alternation (so that a shared machine's load falls on all of them alike), after
  compiling and one warm-up run each."""
  run = jax.jit(lambda p, x: pruned_forward(p, vit.preprocess(x, config), config))
  images = jnp.asarray(images)
  for model in models:
    jax.block_until_ready(run(model, images))
    jax.block_until_ready(run(model, images))
  times = [[] for _ in models]
  for _ in range(repeats):
    for model, log in zip(models, times):
      start = time.perf_counter()
      jax.block_until_ready(run(model, images))
      log.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]
