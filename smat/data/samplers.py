"""Episode samplers: which classes, and which of their images, make up one task.

Both are pure functions of a NumPy `Generator`, so an episode is fixed by the seed words that
made the generator (see `smat.data.loader`). `spans` (from `Domain.spans`) are the classes
under each node of the domain's class hierarchy, for samplers that draw within one node.
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

  def check(self, classes: Sequence[ImageClass], where: str, spans=None) -> None:
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

  def sample(self, classes: Sequence[ImageClass], rng: np.random.Generator,
             spans=None) -> EpisodePlan:
    """`spans` is unused: fixed episodes draw their ways from the split (or one group)."""
    pool = _candidates(classes, self.within_group, self.ways, rng)
    chosen = rng.choice(pool, size=self.ways, replace=False)
    return _take(classes, chosen, [self.shots] * self.ways, [self.queries] * self.ways, rng)

  def max_shape(self) -> tuple[int, int, int]:
    return self.ways, self.ways * self.shots, self.ways * self.queries


def support_shots(sizes: np.ndarray, queries: int, beta: float, log_weights: np.ndarray,
                  max_support: int, max_support_per_class: int,
                  cap_shots_per_class: bool = False) -> np.ndarray:
  """Shots per class, as Meta-Dataset's `sampling.py` allocates them.

  sizes [ways]: images per class; each keeps `queries` for the query set. The budget is
  min(max_support, Σ_c ⌈β · min(max_support_per_class, n_c − q)⌉): the per-class cap bounds a
  class's contribution to the budget, not its shots. Shares R_c ∝ n_c · exp(a_c), so larger
  classes get more shots (the noise alone would ignore class sizes); k_c = min(⌊R_c · (budget −
  ways)⌋ + 1, n_c − q), also ≤ max_support_per_class with `cap_shots_per_class`.
  """
  sizes = np.asarray(sizes, np.int64)
  available = sizes - queries
  budget = min(max_support, int(np.ceil(beta * np.minimum(max_support_per_class, available)).sum()))
  shares = sizes * np.exp(log_weights)
  shots = np.floor(shares / shares.sum() * (budget - len(sizes))).astype(np.int64) + 1
  limit = np.minimum(available, max_support_per_class) if cap_shots_per_class else available
  return np.minimum(shots, limit)


@dataclasses.dataclass(frozen=True)
class MetaDatasetSampler:
  """Meta-Dataset's variable-way variable-shot sampler (Triantafillou et al. 2020).

  Classes: when the domain has a class hierarchy (ImageNet's DAG), all the split's classes
  under one node drawn uniformly among the nodes that span between `min_ways` and
  `max_leaves_per_node` of them, subsampled to `max_ways`; else ways ~ U{min_ways, …,
  min(max_ways, C)}, with `within_group` from one group (Omniglot: one alphabet) chosen
  uniformly among the groups that have at least `min_ways` classes. Per-class queries q =
  min(max_query, ⌊0.5 · smallest chosen class⌋); shots from `support_shots`: a budget of at
  most `max_support` to which each class contributes at most `max_support_per_class`, shared
  ∝ n_c · exp(U[log ½, log 2]). As in Meta-Dataset's code a class may get more shots than
  `max_support_per_class` (a 5-way episode can give one class ~250); `cap_shots_per_class`
  caps each class's shots there too.
  """

  min_ways: int = 5
  max_ways: int = 50
  max_query_per_class: int = 10
  max_support: int = 500
  max_support_per_class: int = 100
  min_log_weight: float = math.log(0.5)
  max_log_weight: float = math.log(2.0)
  within_group: bool = True
  cap_shots_per_class: bool = False
  max_leaves_per_node: int = 392  # hierarchy: nodes spanning more classes are not drawn

  def _eligible(self, spans) -> list[np.ndarray]:
    return [s for s in spans if self.min_ways <= len(s) <= self.max_leaves_per_node]

  def check(self, classes: Sequence[ImageClass], where: str, spans=None) -> None:
    if not 1 <= self.min_ways <= self.max_ways <= self.max_support:
      raise SamplerError(f"sampler: need 1 ≤ min_ways ≤ max_ways ≤ max_support (every way gets a "
                         f"support image), got {self.min_ways}, {self.max_ways}, {self.max_support}")
    if spans:
      if not self._eligible(spans):
        raise SamplerError(f"{where}: no node of the class hierarchy spans {self.min_ways}–"
                           f"{self.max_leaves_per_node} classes of the split; lower min_ways or "
                           f"raise data.max_leaves_per_node")
    else:
      pool = (max((len(g) for g in _group_members(classes, 1)), default=0)
              if self.within_group and any(c.group for c in classes) else len(classes))
      if pool < self.min_ways:
        raise SamplerError(f"{where}: Meta-Dataset episodes need ≥ {self.min_ways} classes"
                           f"{' in one group' if self.within_group else ''}, but it has {pool}")
    for c in classes:
      if c.size < 2:
        raise SamplerError(f"{where}: class {c.name!r} has {c.size} image(s); the Meta-Dataset "
                           f"sampler needs ≥ 2 (one support, one query); remove the class")

  def _choose(self, classes, rng, spans) -> np.ndarray:
    """Positions of the episode's classes: under one hierarchy node, or ways from the pool."""
    if spans:
      eligible = self._eligible(spans)
      node = eligible[rng.integers(len(eligible))]
      if len(node) > self.max_ways:
        node = rng.choice(node, size=self.max_ways, replace=False)
      return np.asarray(node)
    pool = _candidates(classes, self.within_group, self.min_ways, rng)
    ways = int(rng.integers(self.min_ways, min(self.max_ways, len(pool)) + 1))
    return rng.choice(pool, size=ways, replace=False)

  def sample(self, classes: Sequence[ImageClass], rng: np.random.Generator,
             spans=None) -> EpisodePlan:
    chosen = self._choose(classes, rng, spans)
    sizes = np.array([classes[i].size for i in chosen])
    q = min(self.max_query_per_class, int(sizes.min()) // 2)
    beta = 1.0 - rng.random()  # (0, 1]
    log_weights = rng.uniform(self.min_log_weight, self.max_log_weight, size=len(chosen))
    shots = support_shots(sizes, q, beta, log_weights, self.max_support,
                          self.max_support_per_class, self.cap_shots_per_class)
    return _take(classes, chosen, shots, [q] * len(chosen), rng)

  def max_shape(self) -> tuple[int, int, int]:
    return self.max_ways, self.max_support, self.max_ways * self.max_query_per_class
