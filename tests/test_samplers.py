"""Episode samplers: Meta-Dataset statistics over many episodes, shot allocation by hand, class
hierarchies, fixed shapes, and errors."""

import math

import numpy as np
import pytest

from smat.data.domain import Domain, ImageClass, leaf_spans
from smat.data.samplers import FixedSampler, MetaDatasetSampler, support_shots
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
    assert 1 <= len(support) <= size - q
    if sampler.cap_shots_per_class:
      assert len(support) <= sampler.max_support_per_class
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
  assert shots.min() == 1
  assert shots.max() > 100  # the 100-per-class cap bounds the budget, not a class's shots
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
                               max_query_per_class=4, within_group=False,
                               cap_shots_per_class=True)
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


# ----------------------------------------------------------------------------- shot allocation


def test_md_shots_by_hand_for_a_fixed_seed():
  """The sampler's draws replayed by hand: shares ∝ class size × noise, not the noise alone."""
  sizes = [12, 40, 200, 300, 25, 80, 150, 60]
  classes = [ImageClass(f"c{i}", np.arange(1000 * i, 1000 * i + n)) for i, n in enumerate(sizes)]
  sampler = MetaDatasetSampler(min_ways=5, max_ways=8, within_group=False)
  plan = sampler.sample(classes, np.random.default_rng(11))

  rng = np.random.default_rng(11)  # the same draws, in the sampler's order
  ways = int(rng.integers(5, 9))
  chosen = rng.choice(len(classes), size=ways, replace=False)
  beta = 1.0 - rng.random()
  noise = [math.exp(a) for a in rng.uniform(math.log(0.5), math.log(2.0), size=ways)]
  n = [sizes[c] for c in chosen]
  q = min(10, min(n) // 2)
  budget = min(500, sum(math.ceil(beta * min(100, k - q)) for k in n))
  total = sum(k * w for k, w in zip(n, noise))
  expected = [min(math.floor(k * w / total * (budget - ways)) + 1, k - q) for k, w in zip(n, noise)]
  noise_only = [min(math.floor(w / sum(noise) * (budget - ways)) + 1, k - q)
                for k, w in zip(n, noise)]

  np.testing.assert_array_equal(plan.classes, chosen)
  assert [len(s) for s in plan.support] == expected
  assert [len(x) for x in plan.query] == [q] * ways
  assert expected != noise_only  # this seed tells the two formulas apart


def test_support_cap_bounds_the_budget_not_the_shots():
  """Five 300-image classes, one with twice the weight of the others (noise 2 vs ½)."""
  log_weights = np.log([2.0, 0.5, 0.5, 0.5, 0.5])
  sizes = np.full(5, 300)
  # budget = min(500, 5 · ⌈1 · min(100, 290)⌉) = 500; shares 1/2, 1/8 ×4 of 495 spare shots.
  shots = support_shots(sizes, 10, 1.0, log_weights, 500, 100)
  np.testing.assert_array_equal(shots, [248, 62, 62, 62, 62])
  capped = support_shots(sizes, 10, 1.0, log_weights, 500, 100, cap_shots_per_class=True)
  np.testing.assert_array_equal(capped, [100, 62, 62, 62, 62])
  # A cap of 20 per class: budget = 5 · 20 = 100, and the heavy class still gets ⌊½ · 95⌋ + 1.
  np.testing.assert_array_equal(support_shots(sizes, 10, 1.0, log_weights, 500, 20),
                                [48, 12, 12, 12, 12])
  # Class sizes weigh the shares: equal noise, sizes 300 vs 150 → shares 1/3 and 1/6 of 495.
  np.testing.assert_array_equal(
      support_shots(np.array([300, 150, 150, 150, 150]), 10, 1.0, np.zeros(5), 500, 100),
      [166, 83, 83, 83, 83])


def test_md_cap_shots_per_class_option():
  classes = tuple(ImageClass(f"c{i}", np.arange(400 * i, 400 * i + 400)) for i in range(5))
  free = MetaDatasetSampler(within_group=False)
  capped = MetaDatasetSampler(within_group=False, cap_shots_per_class=True)
  most = lambda sampler: max(len(s) for p in sample_many(sampler, classes, 200) for s in p.support)
  assert most(free) > 100
  assert most(capped) == 100


# ----------------------------------------------------------------------------- class hierarchy


def toy_hierarchy():
  """A DAG over classes l0..l89 (l80..l89 are not in the split) plus eligible / ineligible nodes.

  root → big (l0..l59, 60 leaves), mid (l50..l69: shares l50..l59 with big through `shared`),
  tiny (l70..l72: fewer than 5) and gone (l80..l89: no class of the split).
  """
  leaves = lambda a, b: tuple(f"l{i}" for i in range(a, b))
  return {
      "root": ("big", "mid", "tiny", "gone"),
      "big": leaves(0, 50) + ("shared",),
      "shared": leaves(50, 60),
      "mid": ("shared",) + leaves(60, 70),
      "tiny": leaves(70, 73),
      "gone": leaves(80, 90),
  }


def toy_classes():
  rng = np.random.default_rng(5)
  sizes = rng.integers(4, 60, size=75)
  return tuple(ImageClass(f"l{i}", np.arange(100 * i, 100 * i + n)) for i, n in enumerate(sizes))


def test_leaf_spans_of_a_dag():
  classes = toy_classes()
  spans = dict(zip(["big", "mid", "root", "shared", "tiny"],
                   leaf_spans(toy_hierarchy(), [c.name for c in classes])))
  assert spans["big"].tolist() == list(range(60))
  assert spans["mid"].tolist() == list(range(50, 70))
  assert spans["shared"].tolist() == list(range(50, 60))
  assert spans["tiny"].tolist() == [70, 71, 72]
  assert spans["root"].tolist() == list(range(73))  # l73, l74 hang under no node
  assert len(leaf_spans(toy_hierarchy(), [c.name for c in classes])) == 5  # `gone` left out
  domain = Domain("toy", {"train": classes}, read=None, hierarchy=toy_hierarchy())
  assert [s.tolist() for s in domain.spans("train")] == [s.tolist() for s in spans.values()]
  assert Domain("flat", {"train": classes}, read=None).spans("train") is None


def test_md_draws_classes_under_one_hierarchy_node():
  classes = toy_classes()
  domain = Domain("toy", {"train": classes}, read=None, hierarchy=toy_hierarchy())
  spans = domain.spans("train")
  sampler = MetaDatasetSampler(max_leaves_per_node=65)  # root (73 classes) is not eligible
  sampler.check(classes, "toy", spans)
  eligible = {"big": set(range(60)), "mid": set(range(50, 70)), "shared": set(range(50, 60))}
  seen = set()
  for i in range(300):
    plan = sampler.sample(classes, np.random.default_rng([3, i]), spans)
    chosen = set(plan.classes.tolist())
    nodes = [name for name, under in eligible.items() if chosen <= under]
    assert nodes, chosen  # every class of the episode is under one eligible node
    assert 5 <= plan.ways <= 50 and len(chosen) == plan.ways
    if plan.ways == 50:
      seen.add("big")  # subsampled from big's 60
    elif plan.ways in (10, 20):
      seen.add({10: "shared", 20: "mid"}[plan.ways])
      assert chosen == eligible[{10: "shared", 20: "mid"}[plan.ways]]
    else:
      raise AssertionError(f"{plan.ways} ways: no eligible node has that many classes")
    check_plan(classes, plan, sampler)
  assert seen == {"big", "mid", "shared"}
  again = [sampler.sample(classes, np.random.default_rng([3, i]), spans) for i in range(20)]
  for i, plan in enumerate(again):
    first = sampler.sample(classes, np.random.default_rng([3, i]), spans)
    np.testing.assert_array_equal(plan.classes, first.classes)
    for x, y in zip(plan.support + plan.query, first.support + first.query):
      np.testing.assert_array_equal(x, y)


def test_md_hierarchy_bounds_and_errors():
  classes = toy_classes()
  spans = leaf_spans(toy_hierarchy(), [c.name for c in classes])
  ways = {MetaDatasetSampler().sample(classes, np.random.default_rng([4, i]), spans).ways
          for i in range(200)}
  assert ways == {10, 20, 50}  # root's 73 are subsampled to 50 like big's 60
  with pytest.raises(SamplerError, match="no node of the class hierarchy spans 5–8 classes.*"
                                         "data.max_leaves_per_node"):
    MetaDatasetSampler(max_leaves_per_node=8).check(classes, "toy", spans)
