"""Deterministic, checkpointable episode streams.

An episode is a pure function of (seed, split, source, index): the index picks the source
(uniformly, as Meta-Dataset training does) and, with the source's name, seeds the sampler. A
meta-batch `b` holds episodes `b·B … b·B + B − 1`, so the stream is the same whatever the number
of loader threads, and its position is one integer (grain's iterator state) that checkpoints
save and restore. Under multi-host training each process builds its own slice of every batch.
"""

from __future__ import annotations

import dataclasses
import zlib

import grain
import numpy as np

from smat.data import episodes as ep
from smat.data.domain import Domain
from smat.errors import DataError

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "pool": 3}


def _rng(*words: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def source_code(domain: Domain) -> int:
  return zlib.crc32(domain.name.encode())


@dataclasses.dataclass(frozen=True)
class EpisodeSource:
  """Random access to the episodes of one or more domains' `split`.

  Episode `i` is the stream's episode `first + i`: an evaluation that reserves the first few
  episodes (e.g. for a learning-rate search) reports `dataclasses.replace(source, first=k)`.
  Images are resized by `episodes.resize`: `resize_ratio` > 1 resizes to round(ratio · size)
  and centre-crops; None is `episodes.split_resize_ratio`'s default (val and test images
  146/128, train images 1), and `episode_source` gives val and test `data.test_resize_ratio`.
  """

  domains: tuple[Domain, ...]
  split: str
  sampler: object
  image_size: int
  seed: int = 0
  buckets: ep.Buckets | None = None
  first: int = 0
  resize_ratio: float | None = None

  def __post_init__(self):
    if self.split not in _SPLIT_CODE:
      raise DataError(f"split {self.split!r} is not one of {tuple(_SPLIT_CODE)}")
    object.__setattr__(self, "resize_ratio", ep.split_resize_ratio(self.split, self.resize_ratio))
    if not self.resize_ratio >= 1.0:
      raise DataError(f"config field data.test_resize_ratio={self.resize_ratio}: resize to "
                      f"ratio · image size then centre-crop needs a ratio ≥ 1 (1: no crop)")
    usable = [d for d in self.domains if d.classes(self.split)]
    if len(usable) != len(self.domains):
      empty = [d.name for d in self.domains if not d.classes(self.split)]
      raise DataError(f"{', '.join(empty)}: no {self.split} classes (held-out and evaluation-"
                      f"only domains have test classes only; to meta-train on a folder: or "
                      f"tfds: domain, split its classes in the SPEC, e.g. "
                      f"'folder:PATH?split=70/15/15')")
    for d in self.domains:
      self.sampler.check(d.classes(self.split), f"{d.name} [{self.split}]", d.spans(self.split))
    if self.buckets is None:
      object.__setattr__(self, "buckets", ep.Buckets.for_sampler(self.sampler))

  def plan(self, index: int):
    """(domain position, EpisodePlan) of episode `index`, without reading any image."""
    split, index = _SPLIT_CODE[self.split], self.first + index
    position = int(_rng(self.seed, split, index).integers(len(self.domains)))
    domain = self.domains[position]
    rng = _rng(self.seed, split, source_code(domain), index)
    return position, self.sampler.sample(domain.classes(self.split), rng,
                                         domain.spans(self.split))

  def episode(self, index: int) -> ep.Episode:
    position, plan = self.plan(index)
    bucket = self.buckets.fit(plan.ways, plan.num_support, plan.num_query)
    return ep.materialize(plan, self.domains[position].read, self.image_size, bucket, position,
                          self.resize_ratio)


@dataclasses.dataclass(frozen=True)
class BatchSource:
  """Meta-batch `b` = episodes b·B … b·B + B − 1 (this process's slice of them), stacked."""

  episodes: EpisodeSource
  batch_size: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise DataError(f"batch_size {self.batch_size} is not divisible by {self.process_count} processes")

  def __call__(self, batch_index: int) -> ep.Episode:
    local = self.batch_size // self.process_count
    first = batch_index * self.batch_size + self.process_index * local
    return ep.stack([self.episodes.episode(first + i) for i in range(local)])


def batch_iterator(source: EpisodeSource, batch_size: int, num_batches: int | None = None,
                   num_threads: int = 2, prefetch: int = 4, process_index: int = 0,
                   process_count: int = 1, state: dict | None = None):
  """grain iterator over meta-batches; `get_state()`/`set_state()` give exact resume."""
  stop = num_batches if num_batches is not None else np.iinfo(np.int64).max // max(batch_size, 1)
  dataset = grain.MapDataset.range(stop).map(
      BatchSource(source, batch_size, process_index, process_count))
  iterator = iter(dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
  if state is not None:
    iterator.set_state(state)
  return iterator


def even_batch_size(episodes: int, batch_size: int) -> int:
  """The largest batch size ≤ `batch_size` that divides `episodes` (no partial last batch)."""
  return max(b for b in range(1, batch_size + 1) if episodes % b == 0)


def fixed_episodes(source: EpisodeSource, count: int, batch_size: int = 1,
                   num_threads: int = 2) -> list[ep.Episode]:
  """The first `count` episodes of `source` in batches (e.g. validation episodes)."""
  if count % batch_size:
    raise DataError(f"episode count {count} is not divisible by batch size {batch_size}")
  return list(batch_iterator(source, batch_size, count // batch_size, num_threads=num_threads))


def describe_plans(source: EpisodeSource, count: int) -> dict[str, float]:
  """Ways/shots/query statistics over the first `count` episodes (no image reads)."""
  plans = [source.plan(i)[1] for i in range(count)]
  ways = np.array([p.ways for p in plans])
  shots = np.concatenate([[len(s) for s in p.support] for p in plans])
  return {"episodes": count, "ways_mean": float(ways.mean()), "ways_min": int(ways.min()),
          "ways_max": int(ways.max()), "shots_mean": float(shots.mean()),
          "support_mean": float(np.mean([p.num_support for p in plans])),
          "query_mean": float(np.mean([p.num_query for p in plans]))}


def make_sampler(data_config):
  """Sampler from a config's `data` section (fields as in smat/configs/glyphs_small.py)."""
  from smat.data.samplers import FixedSampler, MetaDatasetSampler

  if data_config.sampler == "fixed":
    return FixedSampler(data_config.ways, data_config.shots, data_config.queries)
  if data_config.sampler == "md":
    return MetaDatasetSampler(
        max_ways=data_config.max_ways, max_support=data_config.max_support,
        max_support_per_class=data_config.max_support_per_class,
        max_query_per_class=data_config.max_query_per_class,
        cap_shots_per_class=data_config.get("cap_shots_per_class", False),
        max_leaves_per_node=data_config.get("max_leaves_per_node", 392))
  raise DataError(f"config field data.sampler={data_config.sampler!r}: use 'md' or 'fixed'")


def throughput(source: EpisodeSource, batch_size: int, num_batches: int, num_threads: int,
               prefetch: int = 4) -> dict[str, float]:
  """Episodes/s of the host pipeline (sample, read, resize, pad, stack) after one warm-up batch."""
  import time

  iterator = batch_iterator(source, batch_size, num_batches + 1, num_threads=num_threads,
                            prefetch=prefetch)
  next(iterator)
  start = time.perf_counter()
  count = sum(1 for _ in iterator)
  seconds = time.perf_counter() - start
  return {"threads": num_threads, "batches": count, "episodes": count * batch_size,
          "seconds": seconds, "episodes_per_s": count * batch_size / seconds}


def episode_source(config, split: str, specs: str | None = None, domains=None) -> EpisodeSource:
  """EpisodeSource for `split` from a config's data section.

  Domains come from `domains`, else `specs`, else the config's `data.val` for the val split and
  `data.train` otherwise. The val and test splits' images are resized and centre-cropped by
  `data.test_resize_ratio` (train images are cropped by the on-device augmentation instead).
  """
  from smat.data.spec import load_domains

  if domains is None:
    specs = specs or (config.data.val if split == "val" else config.data.train)
    domains = load_domains(specs, config.data_dir or None, seed=config.seed)
  ratio = 1.0 if split == "train" else config.data.get("test_resize_ratio")
  return EpisodeSource(tuple(domains), split, make_sampler(config.data), config.data.image_size,
                       seed=config.seed, resize_ratio=ratio)
