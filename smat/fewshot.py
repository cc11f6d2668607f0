"""Zero-shot few-shot evaluation of a frozen backbone: ProtoNet on fixed episodes, with 95% CIs.

One jitted function embeds every support and query image of a batch of padded episodes in one
forward pass and scores each episode with the cosine ProtoNet head; episodes of one sampler
share a shape bucket, so a whole evaluation compiles once.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from smat import protonet
from smat.data import loader
from smat.data.episodes import Episode
from smat.data.samplers import FixedSampler
from smat.models import vit


def mean_ci(values) -> tuple[float, float]:
  """(mean, 95% half-width = 1.96 · std / √n), in the units of `values` (population std)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))


def episode_accuracy(support_features, support_labels, support_mask, query_features,
                     query_labels, query_mask, class_mask) -> jax.Array:
  """Query accuracy of one episode under the cosine ProtoNet head."""
  protos = protonet.prototypes(support_features, support_labels, support_mask,
                               class_mask.shape[0])
  logits = protonet.cosine_logits(query_features, protos, class_mask)
  return protonet.accuracy(logits, query_labels, query_mask)


@functools.partial(jax.jit, static_argnums=2)
def batch_accuracy(params, episodes: Episode, config: vit.ViTConfig) -> jax.Array:
  """Accuracies [B] of a stacked batch of episodes (images uint8 [B, N, H, W, 3])."""
  batch, support = episodes.support_images.shape[:2]
  images = jnp.concatenate([
      episodes.support_images.reshape(-1, *episodes.support_images.shape[2:]),
      episodes.query_images.reshape(-1, *episodes.query_images.shape[2:])])
  features = vit.forward(params, vit.preprocess(images, config), config)
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

  batch_size = min(batch_size, episodes)
  while episodes % batch_size:
    batch_size -= 1
  start = time.perf_counter()
  accuracies = []
  batches = loader.batch_iterator(source, batch_size, episodes // batch_size)
  for batch in tqdm(batches, total=episodes // batch_size, desc=progress, leave=False,
                    disable=progress is None, unit="batch"):
    accuracies.append(np.asarray(batch_accuracy(params, batch, config)))
  seconds = time.perf_counter() - start
  accuracies = np.concatenate(accuracies) * 100
  mean, ci = mean_ci(accuracies)
  return {"accuracy": mean, "ci95": ci, "episodes": int(episodes),
          "episodes_per_s": episodes / seconds}


def protonet_report(params, config: vit.ViTConfig, domains: dict[str, list], image_size: int,
                    shots=(1, 5), ways: int = 5, queries: int = 15, episodes: int = 600,
                    seed: int = 0, progress: bool = True) -> dict:
  """{domain name: {"5w1s": {...}, "5w5s": {...}}} on the test classes of each domain group."""
  report = {}
  for name, group in domains.items():
    report[name] = {}
    for k in shots:
      source = loader.EpisodeSource(tuple(group), "test", FixedSampler(ways, k, queries),
                                    image_size, seed=seed)
      label = f"{ways}w{k}s"
      report[name][label] = zero_shot(params, config, source, episodes,
                                      progress=f"{name} {label}" if progress else None)
  return report


def report_table(report: dict) -> str:
  """Markdown: rows = domains, columns = episode kinds, cells = accuracy ± CI."""
  kinds = list(next(iter(report.values())))
  lines = ["| domain | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
  for name, row in report.items():
    cells = [f"{row[k]['accuracy']:.2f} ± {row[k]['ci95']:.2f}" for k in kinds]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
