"""Self-Pruner's search (Huang et al., arXiv 2502.14413): a genetic search of per-group rates
(densities of δ's mask, or kept fractions of a structured pruning) whose size-weighted mean is
fixed, with a repair step after every operator.

The paper lets a language model perform selection, crossover and mutation; here `Operators`
is a standard genetic algorithm (tournament selection, blend crossover, Gaussian mutation) and
anything with the same two methods can replace it (e.g. a local language model).
Budget of the paper: population 30, 10 crossover + 10 mutation children per generation,
20 generations; the population keeps the best `population` of parents and children.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

import numpy as np


def repair(rates, mean: float, low: float, high: float, weights=None) -> np.ndarray:
  """The closest vector to `rates` (Euclidean) with every entry in [low, high] and weighted mean
  `mean`: clip(rates + λ) with λ found by bisection (the mean is monotone in λ)."""
  rates = np.asarray(rates, np.float64)
  weights = np.ones_like(rates) if weights is None else np.asarray(weights, np.float64)
  weights = weights / weights.sum()
  if not low <= mean <= high:
    raise ValueError(f"mean {mean} is outside the bounds [{low}, {high}]")
  shifted = lambda lam: np.clip(rates + lam, low, high)
  lo, hi = low - rates.max(), high - rates.min()
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    if weights @ shifted(mid) < mean:
      lo = mid
    else:
      hi = mid
  return shifted(0.5 * (lo + hi))


class Operator(Protocol):
  def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...
  def mutate(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Genetic:
  """Blend crossover (BLX-α) and Gaussian mutation of every entry."""

  blend: float = 0.5  # BLX-α: the child is drawn from [min − α·d, max + α·d] per entry
  mutation_std: float = 0.05

  def crossover(self, a, b, rng):
    low, high = np.minimum(a, b), np.maximum(a, b)
    spread = self.blend * (high - low)
    return rng.uniform(low - spread, high + spread)

  def mutate(self, a, rng):
    return a + rng.normal(0.0, self.mutation_std, a.shape)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  population: int = 30
  crossover_children: int = 10
  mutation_children: int = 10
  generations: int = 20
  tournament: int = 3
  low: float = 0.0  # bounds of each rate
  high: float = 1.0


def _tournament(fitness: np.ndarray, size: int, rng: np.random.Generator) -> int:
  entrants = rng.choice(len(fitness), size=min(size, len(fitness)), replace=False)
  return int(entrants[np.argmax(fitness[entrants])])


def search(fitness: Callable[[np.ndarray], float], mean: float, weights, seed: int = 0,
           config: SearchConfig = SearchConfig(), operator: Operator = Genetic(),
           progress: bool = False) -> dict:
  """Maximise `fitness(rates)` over rates with weighted mean `mean` and bounds; returns
  {"rates", "fitness", "history": best fitness per generation, "evaluations"}.

  The initial population is the uniform vector plus repaired random perturbations of it; every
  child is repaired before it is scored.
  """
  from tqdm.auto import tqdm

  rng = np.random.default_rng(seed)
  weights = np.asarray(weights, np.float64)
  fix = lambda r: repair(r, mean, config.low, config.high, weights)
  uniform = np.full(len(weights), mean)
  population = [uniform] + [fix(uniform + rng.normal(0, 0.1, len(weights)))
                            for _ in range(config.population - 1)]
  scores = np.asarray([fitness(r) for r in population])
  history, evaluations = [float(scores.max())], len(population)
  for _ in tqdm(range(config.generations), desc="budget search", disable=not progress):
    children = []
    for _ in range(config.crossover_children):
      a = population[_tournament(scores, config.tournament, rng)]
      b = population[_tournament(scores, config.tournament, rng)]
      children.append(fix(operator.crossover(a, b, rng)))
    for _ in range(config.mutation_children):
      children.append(fix(operator.mutate(population[_tournament(scores, config.tournament,
                                                                 rng)], rng)))
    child_scores = np.asarray([fitness(c) for c in children])
    evaluations += len(children)
    pool, pool_scores = population + children, np.concatenate([scores, child_scores])
    best = np.argsort(-pool_scores, kind="stable")[:config.population]
    population, scores = [pool[i] for i in best], pool_scores[best]
    history.append(float(scores[0]))
  return {"rates": population[0].tolist(), "fitness": float(scores[0]), "history": history,
          "evaluations": evaluations}
