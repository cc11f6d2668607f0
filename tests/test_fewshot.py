"""Zero-shot ProtoNet evaluation: CI formula, a hand-checkable toy, padding, cached == direct."""

import jax
import numpy as np
import pytest

from smat import evaluate, fewshot
from smat.data import loader
from smat.data.samplers import FixedSampler, MetaDatasetSampler
from smat.data.spec import load_domains
from smat.models import vit


def test_mean_ci_is_1_96_std_over_sqrt_n():
  values = np.array([50.0, 60.0, 70.0, 80.0])
  mean, ci = fewshot.mean_ci(values)
  assert mean == 65.0
  assert ci == pytest.approx(1.96 * np.sqrt(125.0) / 2.0)


def test_episode_accuracy_on_a_constructed_toy():
  """Classes along the axes; queries placed so exactly 3 of 4 are nearest their own prototype."""
  support = np.array([[1, 0, 0], [3, 0, 0], [0, 1, 0], [0, 0, 2]], np.float32)
  support_labels = np.array([0, 0, 1, 2])
  query = np.array([[5, 1, 0], [0, 2, 1], [1, 0, 3], [0, 3, 0.5]], np.float32)
  query_labels = np.array([0, 1, 2, 2])  # the last one is nearer class 1: wrong
  ones = lambda n: np.ones(n, bool)
  acc = fewshot.episode_accuracy(support, support_labels, ones(4), query, query_labels, ones(4),
                                 ones(3))
  assert float(acc) == pytest.approx(0.75)
  # Padding (zero features, masked rows, an extra masked class) changes nothing.
  pad = lambda x, n: np.concatenate([x, np.zeros((n,) + x.shape[1:], x.dtype)])
  padded = fewshot.episode_accuracy(
      pad(support, 3), pad(support_labels, 3), pad(ones(4), 3), pad(query, 2),
      pad(query_labels, 2), pad(ones(4), 2), pad(ones(3), 2))
  assert float(padded) == pytest.approx(0.75)


@pytest.fixture(scope="module")
def tiny_backbone():
  config = vit.ViTConfig(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, image_size=16)
  return vit.init(config, jax.random.key(0)), config


@pytest.mark.parametrize("sampler", [FixedSampler(3, 2, 2),
                                     MetaDatasetSampler(max_ways=6, max_support=20,
                                                        max_support_per_class=4,
                                                        max_query_per_class=2)],
                         ids=["fixed", "md"])
@pytest.mark.parametrize("ratio", [1.0, 146 / 128], ids=["whole", "centre-crop"])
def test_cached_features_give_the_direct_accuracies(glyphs_data_dir, tiny_backbone, sampler,
                                                    ratio):
  data_dir, _, _ = glyphs_data_dir
  params, config = tiny_backbone
  domains = load_domains("glyphs:id,glyphs:ood", str(data_dir))
  source = loader.EpisodeSource(tuple(domains), "test", sampler, 16, seed=5, resize_ratio=ratio)
  direct = fewshot.zero_shot(params, config, source, 12, batch_size=4)
  cached = fewshot.cached_zero_shot(params, config, source, 12, batch_size=5)
  assert cached["episodes"] == direct["episodes"] == 12
  assert cached["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-4)
  assert cached["ci95"] == pytest.approx(direct["ci95"], abs=1e-4)


def test_report_table_layout():
  cell = {"accuracy": 55.5, "ci95": 1.25, "episodes": 600}
  table = evaluate.report_table({"glyphs:id": {"5w1s": cell, "5w5s": cell}})
  assert table.splitlines() == ["| domain | 5w1s | 5w5s |", "|---|---|---|",
                                "| glyphs:id | 55.50 ± 1.25 | 55.50 ± 1.25 |"]
