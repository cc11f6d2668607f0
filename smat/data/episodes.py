"""Episode arrays, padded to a few shape buckets so `jax.jit` compiles once per bucket.

Layout (one task; a meta-batch stacks a leading task axis):
  support_images uint8 [S, H, W, 3]   support_labels int32 [S]   support_mask bool [S]
  query_images   uint8 [Q, H, W, 3]   query_labels   int32 [Q]   query_mask   bool [Q]
  class_mask     bool  [W]            domain         int32 []
Padded entries have mask False, label 0 and black pixels; every loss, prototype and accuracy
must weight by the masks (`smat.protonet` shows how).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from smat.data.samplers import EpisodePlan, FixedSampler
from smat.errors import SamplerError

DEFAULT_SIZE_BUCKETS = (32, 64, 128, 256, 512)
TEST_RESIZE_RATIO = 146 / 128  # P>M>F's and SMAT's test images: resize 146, centre-crop 128


class Episode(NamedTuple):
  support_images: np.ndarray
  support_labels: np.ndarray
  support_mask: np.ndarray
  query_images: np.ndarray
  query_labels: np.ndarray
  query_mask: np.ndarray
  class_mask: np.ndarray
  domain: np.ndarray

  @property
  def shape_key(self) -> tuple[int, int, int]:
    """(ways, support, query) padded sizes: what a jitted step is specialised on."""
    return self.class_mask.shape[-1], self.support_labels.shape[-1], self.query_labels.shape[-1]


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Padded sizes: the ways axis is always `ways`; support/query round up to the next bucket."""

  ways: int
  support: tuple[int, ...]
  query: tuple[int, ...]

  @classmethod
  def for_sampler(cls, sampler, sizes: Sequence[int] = DEFAULT_SIZE_BUCKETS) -> "Buckets":
    """Fixed samplers get their one exact shape; variable ones geometric buckets up to the max."""
    ways, support, query = sampler.max_shape()
    if isinstance(sampler, FixedSampler):
      return cls(ways, (support,), (query,))
    fit = lambda n: tuple(sorted({s for s in sizes if s < n} | {n}))
    return cls(ways, fit(support), fit(query))

  def fit(self, ways: int, support: int, query: int) -> tuple[int, int, int]:
    def up(n, sizes, what):
      for s in sizes:
        if n <= s:
          return s
      raise SamplerError(f"episode has {n} {what} but the largest bucket is {sizes[-1]}")

    if ways > self.ways:
      raise SamplerError(f"episode has {ways} ways but buckets allow {self.ways}")
    return self.ways, up(support, self.support, "support images"), up(query, self.query, "query images")

  @property
  def count(self) -> int:
    return len(self.support) * len(self.query)


def resize(image: np.ndarray, size: int, ratio: float = 1.0) -> np.ndarray:
  """uint8 [h, w, 3] → [size, size, 3] (bilinear, antialiased).

  ratio 1: the whole image squashed to size × size (untouched when already that size).
  ratio > 1: the shorter side resized to round(ratio · size), aspect kept, then the central
  size × size crop — the evaluation images of P>M>F and SMAT (146 → 128 at 128 px), which frame
  the object as meta-training's random resized crops do on average.
  """
  if ratio == 1.0:
    if image.shape[0] == size and image.shape[1] == size:
      return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  h, w = image.shape[:2]
  short = round(ratio * size)
  new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
  if (new_h, new_w) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return image[top:top + size, left:left + size]


def split_resize_ratio(split: str, ratio: float | None = None) -> float:
  """`ratio`, or by default TEST_RESIZE_RATIO for val and test images and 1 (no crop) for
  meta-training ones, which the on-device augmentation crops instead."""
  if ratio is not None:
    return float(ratio)
  return 1.0 if split == "train" else TEST_RESIZE_RATIO


def _fill(images: list[np.ndarray], labels: list[int], size: int, n: int):
  out = np.zeros((n, size, size, 3), np.uint8)
  if images:
    out[:len(images)] = np.stack(images)
  lab = np.zeros((n,), np.int32)
  lab[:len(labels)] = labels
  mask = np.zeros((n,), bool)
  mask[:len(labels)] = True
  return out, lab, mask


def materialize(plan: EpisodePlan, read: Callable[[int], np.ndarray], image_size: int,
                bucket: tuple[int, int, int], domain: int = 0,
                resize_ratio: float = 1.0) -> Episode:
  """Reads, resizes (`resize`) and pads one planned episode into `bucket` = (ways, support, query)."""
  ways, n_support, n_query = bucket
  s_img, s_lab, q_img, q_lab = [], [], [], []
  for label, (support, query) in enumerate(zip(plan.support, plan.query)):
    s_img += [resize(read(int(i)), image_size, resize_ratio) for i in support]
    s_lab += [label] * len(support)
    q_img += [resize(read(int(i)), image_size, resize_ratio) for i in query]
    q_lab += [label] * len(query)
  class_mask = np.zeros((ways,), bool)
  class_mask[:plan.ways] = True
  return Episode(*_fill(s_img, s_lab, image_size, n_support),
                 *_fill(q_img, q_lab, image_size, n_query),
                 class_mask, np.asarray(domain, np.int32))


def pad(episode: Episode, bucket: tuple[int, int, int]) -> Episode:
  """Pads one episode further, to a larger `bucket`."""
  ways, n_support, n_query = bucket

  def grow(x, n):
    return np.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

  return Episode(grow(episode.support_images, n_support), grow(episode.support_labels, n_support),
                 grow(episode.support_mask, n_support), grow(episode.query_images, n_query),
                 grow(episode.query_labels, n_query), grow(episode.query_mask, n_query),
                 grow(episode.class_mask, ways), episode.domain)


def stack(episodes: Sequence[Episode]) -> Episode:
  """Meta-batch: pads every task to the largest bucket among them and stacks a task axis."""
  bucket = tuple(max(k) for k in zip(*(e.shape_key for e in episodes)))
  return Episode(*(np.stack(field) for field in zip(*(pad(e, bucket) for e in episodes))))

