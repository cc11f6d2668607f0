"""Episode samplers: Meta-Dataset statistics over many episodes, fixed shapes, and errors."""

import numpy as np
import pytest

from smat.data.domain import ImageClass
from smat.data.samplers import FixedSampler, MetaDatasetSampler
from smat.errors import SamplerError

NUM_EPISODES = 2000
GROUP_SIZES = {"alpha": 26, "beta": 15, "gamma": 10, "delta": 5, "tiny": 4}


def make_classes(grouped: bool, seed: int = 0) -> tuple[ImageClass, ...]:
  """60 classes of 3..300 images with disjoint ids; optionally split into groups."""
  rng = np.random.default_rng(seed)
  sizes = rng.integers(3, 301, size=sum(GROUP_SIZES.values()))
  sizes[:4] = (3, 4, 5, 300)
  groups = [g for g, n in GROUP_SIZES.items() for _ in range(n)]
  order = rng.permutation(len(sizes))
  classes, next_id = [], 0
  for position in order:
    size = int(sizes[position])
    classes.append(ImageClass(f"class{position}", np.arange(next_id, next_id + size),
                              groups[position] if grouped else ""))
    next_id += size
  return tuple(classes)


def sample_many(sampler, classes, count=NUM_EPISODES, seed=0):
  return [sampler.sample(classes, np.random.default_rng([seed, i])) for i in range(count)]


@pytest.fixture(scope="module")
def flat_run():
  classes = make_classes(grouped=False)
  sampler = MetaDatasetSampler(within_group=False)
  return classes, sample_many(sampler, classes)


@pytest.fixture(scope="module")
def grouped_run():
  classes = make_classes(grouped=True)
  sampler = MetaDatasetSampler(within_group=True)
  return classes, sample_many(sampler, classes)


def check_plan(classes, plan, sampler):
  """Invariants every Meta-Dataset episode must satisfy."""
  sizes = np.array([classes[c].size for c in plan.classes])
  assert len(set(plan.classes.tolist())) == plan.ways
  assert len(plan.support) == len(plan.query) == plan.ways
  q = min(sampler.max_query_per_class, int(sizes.min()) // 2)
  assert [len(x) for x in plan.query] == [q] * plan.ways
  assert plan.num_support <= sampler.max_support
  for position, size, support, query in zip(plan.classes, sizes, plan.support, plan.query):
    assert 1 <= len(support) <= sampler.max_support_per_class
    assert len(support) + len(query) <= size
    own = set(classes[position].image_ids.tolist())
    assert len(set(support.tolist())) == len(support)
    assert set(support.tolist()) <= own and set(query.tolist()) <= own
    assert not set(support.tolist()) & set(query.tolist())


def test_md_invariants_without_groups(flat_run):
  classes, plans = flat_run
  sampler = MetaDatasetSampler(within_group=False)
  for plan in plans:
    check_plan(classes, plan, sampler)


def test_md_ways_cover_the_whole_range_uniformly(flat_run):
  _, plans = flat_run
  ways = np.array([p.ways for p in plans])
  assert ways.min() == 5 and ways.max() == 50
  assert set(ways.tolist()) == set(range(5, 51))
  assert abs(ways.mean() - 27.5) < 1.5


def test_md_support_sizes_span_the_budget(flat_run):
  _, plans = flat_run
  totals = np.array([p.num_support for p in plans])
  shots = np.concatenate([[len(s) for s in p.support] for p in plans])
  assert 480 <= totals.max() <= 500
  assert totals.min() < 60
  assert shots.min() == 1 and shots.max() == 100
  queries = np.array([len(p.query[0]) for p in plans])
  assert queries.min() == 1 and queries.max() == 10


def test_md_invariants_with_groups(grouped_run):
  classes, plans = grouped_run
  sampler = MetaDatasetSampler(within_group=True)
  for plan in plans:
    check_plan(classes, plan, sampler)
    assert len({classes[c].group for c in plan.classes}) == 1


def test_md_groups_bound_the_ways(grouped_run):
  classes, plans = grouped_run
  by_group = {}
  for plan in plans:
    by_group.setdefault(classes[plan.classes[0]].group, []).append(plan.ways)
  assert set(by_group) == {"alpha", "beta", "gamma", "delta"}
  for group, ways in by_group.items():
    assert min(ways) == 5
    assert max(ways) == min(50, GROUP_SIZES[group])
    assert set(ways) == set(range(5, GROUP_SIZES[group] + 1))
  counts = np.array([len(by_group[g]) for g in ("alpha", "beta", "gamma", "delta")])
  assert np.all(np.abs(counts - NUM_EPISODES / 4) < 120)


def test_md_small_max_ways_and_support():
  classes = make_classes(grouped=False)
  sampler = MetaDatasetSampler(min_ways=3, max_ways=7, max_support=40, max_support_per_class=12,
                               max_query_per_class=4, within_group=False)
  plans = sample_many(sampler, classes, count=500, seed=3)
  for plan in plans:
    check_plan(classes, plan, sampler)
  ways = {p.ways for p in plans}
  assert ways == set(range(3, 8))
  assert 34 <= max(p.num_support for p in plans) <= 40
  assert max(len(s) for p in plans for s in p.support) == 12


def test_md_is_deterministic_in_the_seed_words():
  classes = make_classes(grouped=True)
  sampler = MetaDatasetSampler()
  for i in range(20):
    a = sampler.sample(classes, np.random.default_rng([7, 1, i]))
    b = sampler.sample(classes, np.random.default_rng([7, 1, i]))
    np.testing.assert_array_equal(a.classes, b.classes)
    for x, y in zip(a.support + a.query, b.support + b.query):
      np.testing.assert_array_equal(x, y)
  first = [sampler.sample(classes, np.random.default_rng([7, 1, i])).classes for i in range(20)]
  other = [sampler.sample(classes, np.random.default_rng([8, 1, i])).classes for i in range(20)]
  assert sum(not np.array_equal(a, b) for a, b in zip(first, other)) >= 18


def test_md_check_errors():
  classes = make_classes(grouped=True)
  MetaDatasetSampler().check(classes, "toy")
  with pytest.raises(SamplerError, match="need ≥ 30 classes in one group, but it has 26"):
    MetaDatasetSampler(min_ways=30).check(classes, "toy")
  MetaDatasetSampler(min_ways=30, within_group=False).check(classes, "toy")
  lonely = classes + (ImageClass("lonely", np.array([99999]), "alpha"),)
  with pytest.raises(SamplerError, match="'lonely' has 1 image"):
    MetaDatasetSampler().check(lonely, "toy")


def test_fixed_sampler_shapes():
  classes = tuple(c for c in make_classes(grouped=False) if c.size >= 7)
  sampler = FixedSampler(ways=5, shots=3, queries=4)
  sampler.check(classes, "toy")
  assert sampler.max_shape() == (5, 15, 20)
  for i in range(200):
    plan = sampler.sample(classes, np.random.default_rng([1, i]))
    assert plan.ways == 5 and len(set(plan.classes.tolist())) == 5
    assert [len(s) for s in plan.support] == [3] * 5
    assert [len(q) for q in plan.query] == [4] * 5
    assert plan.num_support == 15 and plan.num_query == 20
    for position, support, query in zip(plan.classes, plan.support, plan.query):
      own = set(classes[position].image_ids.tolist())
      assert set(support.tolist()) | set(query.tolist()) <= own
      assert len(set(support.tolist()) | set(query.tolist())) == 7


def test_fixed_sampler_within_group():
  classes = make_classes(grouped=True)
  sampler = FixedSampler(ways=10, shots=1, queries=1, within_group=True)
  seen = set()
  for i in range(200):
    plan = sampler.sample(classes, np.random.default_rng([2, i]))
    groups = {classes[c].group for c in plan.classes}
    assert len(groups) == 1
    seen |= groups
  assert seen == {"alpha", "beta", "gamma"}


def test_fixed_sampler_check_errors():
  classes = make_classes(grouped=True)
  FixedSampler(ways=5, shots=1, queries=2).check(classes, "toy")
  with pytest.raises(SamplerError, match="61-way episodes need ≥ 61 classes, but it has 60"):
    FixedSampler(ways=61).check(classes, "toy")
  with pytest.raises(SamplerError, match="in one group, but it has 26"):
    FixedSampler(ways=27, shots=1, queries=1, within_group=True).check(classes, "toy")
  smallest = min(classes, key=lambda c: c.size)
  assert smallest.size == 3
  with pytest.raises(SamplerError, match=f"'{smallest.name}' has 3 images .* needs 4"):
    FixedSampler(ways=5, shots=2, queries=2).check(classes, "toy")
  with pytest.raises(SamplerError, match="ways ≥ 1, shots ≥ 1"):
    FixedSampler(ways=5, shots=0).check(classes, "toy")


def test_md_sampler_rejects_a_support_budget_below_the_ways():
  classes = [ImageClass(f"c{i}", np.arange(i * 20, i * 20 + 20)) for i in range(10)]
  with pytest.raises(SamplerError, match="max_ways ≤ max_support"):
    MetaDatasetSampler(max_ways=10, max_support=8).check(classes, "toy")
