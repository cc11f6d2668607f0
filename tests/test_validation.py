"""Validation as the authors select checkpoints: fixed episodes per validation source, accuracy
reported per source, and the mean of the per-source accuracies as the selection metric."""

import numpy as np
import pytest

from smat import metatrain
from smat.data import episodes as ep
from smat.data import loader
from smat.data.domain import Domain, ImageClass
from smat.meta import defaults

SIZE = 8


class IdPixels:
  """Pixel (0, 0) holds the image id (id % 256, id // 256); the rest is seeded noise."""

  def __call__(self, image_id: int) -> np.ndarray:
    pixels = np.random.default_rng(image_id).integers(1, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[0, 0] = (image_id % 256, image_id // 256, 255)
    return pixels


def make_domain(name: str, first_id: int) -> Domain:
  classes = tuple(ImageClass(f"{name}-{c}", np.arange(first_id + 10 * c, first_id + 10 * c + 6))
                  for c in range(6))
  return Domain(name=name, splits={"train": classes, "val": classes}, read=IdPixels())


def small_config(val: str):
  config = defaults.base()
  config.data.val = val
  config.data.sampler, config.data.ways, config.data.shots, config.data.queries = "fixed", 3, 1, 2
  config.data.image_size = SIZE
  config.data.test_resize_ratio = 1.0  # the ids in pixel (0, 0) stay readable
  config.data.loader_threads = 1
  config.val.episodes, config.val.batch_size = 4, 2
  return config


class StubRun:
  """`evaluate` only asks a run for per-episode accuracies: here each batch is its accuracies."""

  def zero_shot_accuracy(self, batch):
    return np.asarray(batch), np.stack([np.asarray(batch), 1 - np.asarray(batch)], -1)


def result(accuracy, ci95, episodes, alpha=None):
  r = {"accuracy": accuracy, "ci95": ci95, "episodes": episodes, "episodes_per_s": 10.0,
       "per_episode": [accuracy] * episodes}
  return r if alpha is None else {**r, "alpha_mean": alpha}


def test_combine_sources_is_the_mean_of_the_per_source_accuracies():
  combined = metatrain.combine_sources({"a": result(80.0, 2.0, 120, [0.5, 0.5]),
                                        "b": result(60.0, 4.0, 40, [0.1, 0.9])})
  assert combined["accuracy"] == 70.0  # not the episode-weighted 75
  assert combined["ci95"] == pytest.approx(np.sqrt(2.0 ** 2 + 4.0 ** 2) / 2)
  assert combined["episodes"] == 160 and len(combined["per_episode"]) == 160
  np.testing.assert_allclose(combined["alpha_mean"], [0.4, 0.6])  # per episode, as one stream
  assert combined["per_source"] == {"a": {"accuracy": 80.0, "ci95": 2.0, "episodes": 120},
                                    "b": {"accuracy": 60.0, "ci95": 4.0, "episodes": 40}}


def test_one_source_keeps_its_numbers():
  alone = result(62.5, 3.0, 40, [0.3, 0.7])
  combined = metatrain.combine_sources({"glyphs:id": alone})
  assert {k: v for k, v in combined.items() if k != "per_source"} == alone
  assert combined["per_source"] == {"glyphs:id": {"accuracy": 62.5, "ci95": 3.0, "episodes": 40}}


def test_evaluate_per_source_batches():
  run = StubRun()
  a = [np.array([1.0, 1.0]), np.array([0.5, 0.5])]
  b = [np.array([0.0, 0.0])]
  combined = metatrain.evaluate(run, {"a": a, "b": b})
  assert combined["per_source"]["a"]["accuracy"] == 75.0
  assert combined["per_source"]["b"]["accuracy"] == 0.0
  assert combined["accuracy"] == 37.5  # pooled over the 6 episodes it would be 50
  alone, flat = metatrain.evaluate(run, {"a": a}), metatrain.evaluate(run, a)
  for key in ("accuracy", "ci95", "episodes", "per_episode", "alpha_mean"):
    assert alone[key] == flat[key]


def test_validation_sources_give_each_source_its_own_episodes(monkeypatch):
  north, south = make_domain("north", 0), make_domain("south", 1000)
  monkeypatch.setattr("smat.data.spec.load_domains", lambda specs, data_dir, seed: {
      "north": [north], "north,south": [north, south]}[specs])
  config = small_config("north,south")
  sources = metatrain.validation_sources(config)
  assert list(sources) == ["north", "south"]
  for domain, batches in zip((north, south), sources.values()):
    assert len(batches) == 2 and all(b.support_images.shape[0] == 2 for b in batches)
    own = loader.EpisodeSource((domain,), "val", loader.make_sampler(config.data), SIZE,
                               seed=config.seed, resize_ratio=1.0)
    for i, episode in enumerate(e for b in batches for e in zip(*b)):
      for x, y in zip(episode, own.episode(i)):
        np.testing.assert_array_equal(x, y)
  flat = metatrain.validation_batches(config)
  assert len(flat) == 4  # val.episodes per source, source after source

  single = small_config("north")  # one source: the stream it always validated on
  before = loader.fixed_episodes(loader.episode_source(single, "val", domains=[north]), 4, 2,
                                 num_threads=1)
  for x, y in zip(metatrain.validation_batches(single), before):
    for a, b in zip(x, y):
      np.testing.assert_array_equal(a, b)


def test_validation_images_are_centre_cropped(monkeypatch):
  north = make_domain("north", 0)
  monkeypatch.setattr("smat.data.spec.load_domains", lambda specs, data_dir, seed: [north])
  config = small_config("north")
  config.data.test_resize_ratio = 1.5
  (batch, *_), = metatrain.validation_sources(config).values()
  source = loader.episode_source(config, "val", domains=[north])
  _, plan = source.plan(0)
  np.testing.assert_array_equal(batch.support_images[0, 0],
                                ep.resize(north.read(int(plan.support[0][0])), SIZE, 1.5))
