"""Zero-shot few-shot evaluation of a frozen backbone: ProtoNet on fixed episodes, with 95% CIs.

Two equivalent routes. `zero_shot` embeds every support and query image of a batch of padded
episodes in one jitted forward pass. `cached_zero_shot` embeds each test image of a domain once
and assembles episodes from that feature table — the same numbers (a frozen backbone without
augmentation gives an image the same feature in every episode) for a fraction of the compute:
600 5-way 5-shot episodes touch 60,000 images but a glyph script has ~2,000. Episodes of one
sampler share a shape bucket, so either route compiles once.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from smat import protonet
from smat.data import loader
from smat.data.episodes import Episode, resize, split_resize_ratio
from smat.embed import embed_all, embed_images
from smat.models import vit


def mean_ci(values) -> tuple[float, float]:
  """(mean, 95% half-width = 1.96 · std / √n), in the units of `values` (population std)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))


def accuracy_summary(accuracies, seconds: float) -> dict:
  """{accuracy %, 95% CI, episodes, episodes/s, per-episode accuracies %} of per-episode
  accuracies in [0, 1] (kept so that methods run on the same episodes compare pairwise)."""
  accuracies = np.concatenate([np.ravel(a) for a in accuracies]) * 100
  mean, ci = mean_ci(accuracies)
  return {"accuracy": mean, "ci95": ci, "episodes": int(accuracies.size),
          "episodes_per_s": accuracies.size / seconds,
          "per_episode": [round(float(a), 4) for a in accuracies]}


def episode_accuracy(support_features, support_labels, support_mask, query_features,
                     query_labels, query_mask, class_mask) -> jax.Array:
  """Query accuracy of one episode under the cosine ProtoNet head; NaN when a logit of a real
  query is not finite (NaN/Inf features would otherwise score as class 0, a chance-level number
  that reads like a result)."""
  protos = protonet.prototypes(support_features, support_labels, support_mask,
                               class_mask.shape[0])
  logits = protonet.cosine_logits(query_features, protos, class_mask)
  finite = jnp.all(jnp.isfinite(logits) | ~query_mask[:, None])
  return jnp.where(finite, protonet.accuracy(logits, query_labels, query_mask), jnp.nan)


@functools.partial(jax.jit, static_argnums=2)
def batch_accuracy(params, episodes: Episode, config: vit.ViTConfig) -> jax.Array:
  """Accuracies [B] of a stacked batch of episodes (images uint8 [B, N, H, W, 3])."""
  batch, support = episodes.support_images.shape[:2]
  images = jnp.concatenate([
      episodes.support_images.reshape(-1, *episodes.support_images.shape[2:]),
      episodes.query_images.reshape(-1, *episodes.query_images.shape[2:])])
  features = embed_images(params, images, config)
  support_features = features[:batch * support].reshape(batch, support, -1)
  query_features = features[batch * support:].reshape(batch, -1, features.shape[-1])
  return jax.vmap(episode_accuracy)(support_features, episodes.support_labels,
                                    episodes.support_mask, query_features,
                                    episodes.query_labels, episodes.query_mask,
                                    episodes.class_mask)


def zero_shot(params, config: vit.ViTConfig, source: loader.EpisodeSource, episodes: int,
              batch_size: int = 20, progress: str | None = None) -> dict:
  """Accuracy (%) with 95% CI over the first `episodes` episodes of `source`."""
  from tqdm.auto import tqdm

  batch_size = loader.even_batch_size(episodes, batch_size)
  start = time.perf_counter()
  accuracies = []
  batches = loader.batch_iterator(source, batch_size, episodes // batch_size)
  for batch in tqdm(batches, total=episodes // batch_size, desc=progress, leave=False,
                    disable=progress is None, unit="batch"):
    accuracies.append(np.asarray(batch_accuracy(params, batch, config)))
  return accuracy_summary(accuracies, time.perf_counter() - start)


def embed_split(params, config: vit.ViTConfig, domain, split: str, image_size: int,
                batch_size: int = 256,
                resize_ratio: float | None = None) -> tuple[dict[int, int], np.ndarray]:
  """({image id: row}, features [N, D]) for every image of the `split` classes of `domain`,
  resized as that split's episodes resize them (`episodes.split_resize_ratio`)."""
  ids = np.unique(np.concatenate([c.image_ids for c in domain.classes(split)]))
  ratio = split_resize_ratio(split, resize_ratio)
  load = lambda i: resize(domain.read(int(ids[i])), image_size, ratio)
  features = embed_all(params, config, load, len(ids), image_size, batch_size)
  return {int(i): row for row, i in enumerate(ids)}, features


def _episode_features(plan, rows: dict[int, int], table: np.ndarray, bucket):
  """Padded (support feats, labels, mask, query feats, labels, mask, class mask) of one plan."""
  ways, n_support, n_query = bucket

  def fill(per_class, n):
    ids = [int(i) for group in per_class for i in group]
    labels = [c for c, group in enumerate(per_class) for _ in group]
    feats = np.zeros((n, table.shape[1]), np.float32)
    feats[:len(ids)] = table[[rows[i] for i in ids]]
    lab = np.zeros((n,), np.int32)
    lab[:len(ids)] = labels
    return feats, lab, np.arange(n) < len(ids)

  class_mask = np.arange(ways) < plan.ways
  return (*fill(plan.support, n_support), *fill(plan.query, n_query), class_mask)


_batch_episode_accuracy = jax.jit(jax.vmap(episode_accuracy))


def cached_zero_shot(params, config: vit.ViTConfig, source: loader.EpisodeSource,
                     episodes: int, batch_size: int = 50, tables: list | None = None) -> dict:
  """`zero_shot` through a per-domain feature table (each test image embedded once).

  `tables` (one `embed_split` result per domain of `source`) lets evaluations of the same
  domains with other samplers reuse the features.
  """
  start = time.perf_counter()
  if tables is None:
    tables = [embed_split(params, config, d, source.split, source.image_size,
                          resize_ratio=source.resize_ratio) for d in source.domains]
  accuracies = []
  for first in range(0, episodes, batch_size):
    rows, by_bucket = [], {}
    for index in range(first, min(first + batch_size, episodes)):
      position, plan = source.plan(index)
      bucket = source.buckets.fit(plan.ways, plan.num_support, plan.num_query)
      by_bucket.setdefault(bucket, []).append(len(rows))
      rows.append(_episode_features(plan, *tables[position], bucket))
    batch_acc = np.zeros(len(rows))
    for members in by_bucket.values():
      stacked = [np.stack([rows[i][k] for i in members]) for k in range(7)]
      batch_acc[members] = np.asarray(_batch_episode_accuracy(*stacked))
    accuracies.append(batch_acc)
  return accuracy_summary(accuracies, time.perf_counter() - start)


def worth_caching(source: loader.EpisodeSource, episodes: int) -> bool:
  """Whether embedding every test image once is cheaper than embedding each episode's images."""
  plans = [source.plan(i)[1] for i in range(min(episodes, 10))]
  per_episode = np.mean([p.num_support + p.num_query for p in plans])
  table_images = sum(c.size for d in source.domains for c in d.classes(source.split))
  return episodes * per_episode >= table_images
