"""Episode samplers: which classes, and which of their images, make up one task.

Both are pure functions of a NumPy `Generator`, so an episode is fixed by the seed words that
made the generator (see `smat.data.loader`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from smat.data.domain import ImageClass
from smat.errors import SamplerError


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
  """Chosen classes (positions in the split) and per-class support/query image ids."""

  classes: np.ndarray  # [ways] int
  support: tuple[np.ndarray, ...]  # per class: image ids
  query: tuple[np.ndarray, ...]

  @property
  def ways(self) -> int:
    return len(self.classes)

  @property
  def num_support(self) -> int:
    return sum(len(s) for s in self.support)

  @property
  def num_query(self) -> int:
    return sum(len(q) for q in self.query)


def _group_members(classes: Sequence[ImageClass], min_size: int) -> list[np.ndarray]:
  """Class positions per group (script/alphabet) with at least `min_size` classes."""
  groups: dict[str, list[int]] = {}
  for i, c in enumerate(classes):
    groups.setdefault(c.group, []).append(i)
  return [np.asarray(v) for _, v in sorted(groups.items()) if len(v) >= min_size]


def _candidates(classes, within_group: bool, min_ways: int, rng) -> np.ndarray:
  if within_group and any(c.group for c in classes):
    groups = _group_members(classes, min_ways)
    return groups[rng.integers(len(groups))]
  return np.arange(len(classes))


def _take(classes, chosen, shots, queries, rng) -> EpisodePlan:
  support, query = [], []
  for position, k, q in zip(chosen, shots, queries):
    ids = rng.permutation(classes[position].image_ids)
    support.append(ids[:k])
    query.append(ids[k:k + q])
  return EpisodePlan(np.asarray(chosen), tuple(support), tuple(query))


@dataclasses.dataclass(frozen=True)
class FixedSampler:
  """N-way K-shot Q-query episodes, classes uniformly at random from the split."""

  ways: int = 5
  shots: int = 1
  queries: int = 15
  within_group: bool = False  # draw the ways from one group (script/alphabet)

  def check(self, classes: Sequence[ImageClass], where: str) -> None:
    if self.ways < 1 or self.shots < 1 or self.queries < 0:
      raise SamplerError(f"sampler: need ways ≥ 1, shots ≥ 1 and queries ≥ 0, got "
                         f"{self.ways}-way {self.shots}-shot {self.queries}-query")
    pool = (max((len(g) for g in _group_members(classes, 1)), default=0)
            if self.within_group else len(classes))
    if self.ways > pool:
      raise SamplerError(f"{where}: {self.ways}-way episodes need ≥ {self.ways} classes"
                         f"{' in one group' if self.within_group else ''}, but it has {pool}; "
                         f"lower --ways")
    need = self.shots + self.queries
    for c in classes:
      if c.size < need:
        raise SamplerError(
            f"{where}: class {c.name!r} has {c.size} images but {self.shots}-shot + "
            f"{self.queries}-query needs {need}; lower --shots/--queries or remove the class")

  def sample(self, classes: Sequence[ImageClass], rng: np.random.Generator) -> EpisodePlan:
    pool = _candidates(classes, self.within_group, self.ways, rng)
    chosen = rng.choice(pool, size=self.ways, replace=False)
    return _take(classes, chosen, [self.shots] * self.ways, [self.queries] * self.ways, rng)

  def max_shape(self) -> tuple[int, int, int]:
    return self.ways, self.ways * self.shots, self.ways * self.queries


@dataclasses.dataclass(frozen=True)
class MetaDatasetSampler:
  """Meta-Dataset's variable-way variable-shot sampler (Triantafillou et al. 2020).

  ways ~ U{min_ways, …, min(max_ways, C)}; per-class queries q = min(max_query,
  ⌊0.5 · smallest chosen class⌋); support budget = min(max_support, Σ_c ⌈β · min(max_support_
  per_class, n_c − q)⌉) with β ~ U(0, 1]; shots k_c = min(⌊R_c · (budget − ways)⌋ + 1, n_c − q)
  with R = softmax(a), a_c ~ U[log ½, log 2] (class-imbalanced allocation). k_c is also capped
  at `max_support_per_class` (protocol.md: ≤ 100 per class; Meta-Dataset's code applies that
  cap only to the budget, which can leave a 5-way class with ~250 shots). With
  `within_group`, the ways come from one group (Omniglot: one alphabet), chosen uniformly
  among the groups that have at least `min_ways` classes.
  """

  min_ways: int = 5
  max_ways: int = 50
  max_query_per_class: int = 10
  max_support: int = 500
  max_support_per_class: int = 100
  min_log_weight: float = math.log(0.5)
  max_log_weight: float = math.log(2.0)
  within_group: bool = True

  def check(self, classes: Sequence[ImageClass], where: str) -> None:
    if not 1 <= self.min_ways <= self.max_ways <= self.max_support:
      raise SamplerError(f"sampler: need 1 ≤ min_ways ≤ max_ways ≤ max_support (every way gets a "
                         f"support image), got {self.min_ways}, {self.max_ways}, {self.max_support}")
    pool = (max((len(g) for g in _group_members(classes, 1)), default=0)
            if self.within_group and any(c.group for c in classes) else len(classes))
    if pool < self.min_ways:
      raise SamplerError(f"{where}: Meta-Dataset episodes need ≥ {self.min_ways} classes"
                         f"{' in one group' if self.within_group else ''}, but it has {pool}")
    for c in classes:
      if c.size < 2:
        raise SamplerError(f"{where}: class {c.name!r} has {c.size} image(s); the Meta-Dataset "
                           f"sampler needs ≥ 2 (one support, one query); remove the class")

  def sample(self, classes: Sequence[ImageClass], rng: np.random.Generator) -> EpisodePlan:
    pool = _candidates(classes, self.within_group, self.min_ways, rng)
    ways = int(rng.integers(self.min_ways, min(self.max_ways, len(pool)) + 1))
    chosen = rng.choice(pool, size=ways, replace=False)
    sizes = np.array([classes[i].size for i in chosen])
    q = min(self.max_query_per_class, int(sizes.min()) // 2)
    available = sizes - q
    beta = 1.0 - rng.random()  # (0, 1]
    budget = min(self.max_support,
                 int(np.ceil(beta * np.minimum(self.max_support_per_class, available)).sum()))
    weights = np.exp(rng.uniform(self.min_log_weight, self.max_log_weight, size=ways))
    ratios = weights / weights.sum()
    shots = np.minimum(np.floor(ratios * (budget - ways)).astype(int) + 1,
                       np.minimum(available, self.max_support_per_class))
    return _take(classes, chosen, shots, [q] * ways, rng)

  def max_shape(self) -> tuple[int, int, int]:
    return self.max_ways, self.max_support, self.max_ways * self.max_query_per_class
