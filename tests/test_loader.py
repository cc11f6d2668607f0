"""Episode streams: determinism, threads, resume, padding, buckets and multi-process slices."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import protonet
from smat.data import episodes as ep
from smat.data import loader
from smat.data.domain import Domain, ImageClass
from smat.data.samplers import FixedSampler, MetaDatasetSampler
from smat.errors import DataError, SamplerError

SIZE = 8
SMALL_MD = MetaDatasetSampler(max_ways=10, max_support=50, max_query_per_class=5)


class IdPixels:
  """Pixels that encode the image id: pixel (0, 0) is (id % 256, id // 256, 255)."""

  def __call__(self, image_id: int) -> np.ndarray:
    pixels = np.random.default_rng(image_id).integers(1, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels[0, 0] = (image_id % 256, image_id // 256, 255)
    return pixels


def decode(images: np.ndarray) -> np.ndarray:
  """Image ids of uint8 [N, H, W, 3] images made by `IdPixels`."""
  return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def make_domain(name: str, first_id: int, num_classes: int = 24, seed: int = 0) -> Domain:
  rng = np.random.default_rng(seed)
  splits, next_id = {}, first_id
  for split, count in (("train", num_classes), ("val", 15)):
    classes = []
    for c in range(count):
      size = int(rng.integers(2, 41))
      classes.append(ImageClass(f"{name}-{split}-{c}", np.arange(next_id, next_id + size),
                                f"g{c % 3}"))
      next_id += size
    splits[split] = tuple(classes)
  return Domain(name=name, splits=splits, read=IdPixels())


def make_source(seed=0, sampler=SMALL_MD, split="train", two_domains=True):
  domains = (make_domain("north", 0),)
  if two_domains:
    domains += (make_domain("south", 20000, num_classes=18, seed=1),)
  # No crop of val images, so that pixel (0, 0) still holds the image id.
  return loader.EpisodeSource(domains, split, sampler, SIZE, seed=seed, resize_ratio=1.0)


def assert_episodes_equal(a: ep.Episode, b: ep.Episode):
  for field, x, y in zip(ep.Episode._fields, a, b):
    assert x.shape == y.shape, field
    np.testing.assert_array_equal(x, y, err_msg=field)


def unstack(batch: ep.Episode) -> list[ep.Episode]:
  return [ep.Episode(*(field[i] for field in batch)) for i in range(batch.domain.shape[0])]


def test_episode_is_a_pure_function_of_seed_split_index():
  a, b = make_source(seed=3), make_source(seed=3)
  for i in range(12):
    assert_episodes_equal(a.episode(i), b.episode(i))
  other = make_source(seed=4)
  differ = sum(not np.array_equal(a.episode(i).support_images, other.episode(i).support_images)
               for i in range(12))
  assert differ >= 11
  val = make_source(seed=3, split="val")
  for i in range(8):
    position, plan = val.plan(i)
    val_ids = {int(x) for c in val.domains[position].classes("val") for x in c.image_ids}
    episode = val.episode(i)
    ids = decode(np.concatenate([episode.support_images[episode.support_mask],
                                 episode.query_images[episode.query_mask]]))
    assert set(ids.tolist()) <= val_ids


def test_episode_images_match_the_plan():
  source = make_source(seed=1)
  positions = []
  for i in range(30):
    position, plan = source.plan(i)
    positions.append(position)
    episode = source.episode(i)
    assert int(episode.domain) == position
    classes = source.domains[position].classes("train")
    s, q = plan.num_support, plan.num_query
    np.testing.assert_array_equal(decode(episode.support_images[:s]), np.concatenate(plan.support))
    np.testing.assert_array_equal(decode(episode.query_images[:q]), np.concatenate(plan.query))
    np.testing.assert_array_equal(episode.support_labels[:s],
                                  np.repeat(np.arange(plan.ways), [len(x) for x in plan.support]))
    np.testing.assert_array_equal(episode.query_labels[:q],
                                  np.repeat(np.arange(plan.ways), [len(x) for x in plan.query]))
    for label, position_in_split in enumerate(plan.classes):
      ids = decode(episode.support_images[:s][episode.support_labels[:s] == label])
      assert set(ids.tolist()) <= set(classes[position_in_split].image_ids.tolist())
  assert set(positions) == {0, 1}
  assert 8 <= sum(positions) <= 22


def test_threads_do_not_change_the_stream():
  source = make_source(seed=2)
  one = list(loader.batch_iterator(source, 3, num_batches=5, num_threads=1))
  two = list(loader.batch_iterator(source, 3, num_batches=5, num_threads=2))
  direct = loader.BatchSource(source, 3)
  assert len(one) == len(two) == 5
  for b, (x, y) in enumerate(zip(one, two)):
    assert x.support_images.shape[0] == 3
    assert_episodes_equal(x, y)
    assert_episodes_equal(x, direct(b))
    for j, task in enumerate(unstack(x)):
      real = source.episode(3 * b + j)
      assert_episodes_equal(task, ep.pad(real, task.shape_key))


def test_save_and_restore_continue_identically():
  source = make_source(seed=5)
  iterator = loader.batch_iterator(source, 2, num_threads=2)
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(4)]
  resumed = loader.batch_iterator(source, 2, num_threads=1, state=state)
  direct = loader.BatchSource(source, 2)
  for b, (x, y) in enumerate(zip(expected, (next(resumed) for _ in range(4)))):
    assert_episodes_equal(x, y)
    assert_episodes_equal(x, direct(3 + b))
  fresh = next(loader.batch_iterator(source, 2, num_threads=1))
  assert not np.array_equal(fresh.support_images, expected[0].support_images)


def test_bucket_sizes():
  md = ep.Buckets.for_sampler(MetaDatasetSampler())
  assert md == ep.Buckets(50, (32, 64, 128, 256, 500), (32, 64, 128, 256, 500))
  assert md.count == 25
  small = ep.Buckets.for_sampler(SMALL_MD)
  assert small == ep.Buckets(10, (32, 50), (32, 50))
  assert small.count == 4
  fixed = ep.Buckets.for_sampler(FixedSampler(5, 5, 15))
  assert fixed == ep.Buckets(5, (25,), (75,)) and fixed.count == 1
  assert md.fit(7, 33, 32) == (50, 64, 32)
  assert md.fit(50, 500, 1) == (50, 500, 32)
  with pytest.raises(SamplerError, match="501 support images"):
    md.fit(5, 501, 10)
  with pytest.raises(SamplerError, match="51 ways"):
    md.fit(51, 10, 10)


def test_materialize_masks_and_zero_padding():
  source = make_source(seed=6, two_domains=False)
  _, plan = source.plan(0)
  bucket = (plan.ways + 3, plan.num_support + 5, plan.num_query + 4)
  episode = ep.materialize(plan, source.domains[0].read, SIZE, bucket)
  s, q = plan.num_support, plan.num_query
  assert episode.shape_key == bucket
  assert episode.support_images.shape == (bucket[1], SIZE, SIZE, 3)
  assert episode.support_images.dtype == np.uint8
  np.testing.assert_array_equal(episode.class_mask, np.arange(bucket[0]) < plan.ways)
  np.testing.assert_array_equal(episode.support_mask, np.arange(bucket[1]) < s)
  np.testing.assert_array_equal(episode.query_mask, np.arange(bucket[2]) < q)
  assert not episode.support_images[s:].any() and not episode.query_images[q:].any()
  assert not episode.support_labels[s:].any() and not episode.query_labels[q:].any()
  assert (episode.support_images[:s, 0, 0, 2] == 255).all()
  assert (episode.query_images[:q, 0, 0, 2] == 255).all()

  grown = ep.pad(episode, (bucket[0] + 2, bucket[1] + 6, bucket[2] + 1))
  assert grown.shape_key == (bucket[0] + 2, bucket[1] + 6, bucket[2] + 1)
  assert grown.support_mask.sum() == s and grown.query_mask.sum() == q
  assert grown.class_mask.sum() == plan.ways
  np.testing.assert_array_equal(grown.support_images[:bucket[1]], episode.support_images)
  assert not grown.support_images[bucket[1]:].any()


def test_stack_pads_each_task_to_the_largest():
  source = make_source(seed=7)
  plans = [source.plan(i)[1] for i in range(6)]
  batch = ep.stack([source.episode(i) for i in range(6)])
  keys = [source.episode(i).shape_key for i in range(6)]
  assert batch.shape_key == tuple(max(k) for k in zip(*keys))
  assert batch.support_images.shape[:2] == (6, batch.shape_key[1])
  np.testing.assert_array_equal(batch.support_mask.sum(1), [p.num_support for p in plans])
  np.testing.assert_array_equal(batch.query_mask.sum(1), [p.num_query for p in plans])
  np.testing.assert_array_equal(batch.class_mask.sum(1), [p.ways for p in plans])
  for task, plan in zip(unstack(batch), plans):
    assert task.support_mask[:plan.num_support].all()
    assert not task.support_images[~task.support_mask].any()
    assert not task.query_images[~task.query_mask].any()
    assert (task.support_images[task.support_mask][:, 0, 0, 2] == 255).all()


def test_md_episodes_use_few_buckets():
  sampler = MetaDatasetSampler(max_ways=20, max_support=200, max_query_per_class=5)
  source = make_source(seed=8, sampler=sampler)
  buckets = source.buckets
  assert buckets == ep.Buckets(20, (32, 64, 128, 200), (32, 64, 100))
  keys = set()
  for i in range(200):
    _, plan = source.plan(i)
    episode = source.episode(i)
    ways, support, query = episode.shape_key
    assert ways == buckets.ways
    assert support in buckets.support and query in buckets.query
    smaller_s = [b for b in buckets.support if b < support]
    smaller_q = [b for b in buckets.query if b < query]
    assert plan.num_support <= support and all(plan.num_support > b for b in smaller_s)
    assert plan.num_query <= query and all(plan.num_query > b for b in smaller_q)
    keys.add(episode.shape_key)
  assert 2 <= len(keys) <= buckets.count


def features_of(images, projection):
  flat = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0
  return flat @ projection


@jax.jit
def head(episode: ep.Episode, projection):
  ways = episode.class_mask.shape[0]
  support = features_of(episode.support_images, projection)
  query = features_of(episode.query_images, projection)
  protos = protonet.prototypes(support, jnp.asarray(episode.support_labels),
                               jnp.asarray(episode.support_mask), ways)
  logits = protonet.cosine_logits(query, protos, jnp.asarray(episode.class_mask))
  labels, mask = jnp.asarray(episode.query_labels), jnp.asarray(episode.query_mask)
  loss = protonet.cross_entropy(logits, labels, mask)
  return protos, logits, loss, protonet.accuracy(logits, labels, mask)


def reference_head(episode: ep.Episode, projection):
  """NumPy ProtoNet on an unpadded episode."""
  projection = np.asarray(projection, np.float64)
  support = episode.support_images.reshape(len(episode.support_labels), -1) / 255.0 @ projection
  query = episode.query_images.reshape(len(episode.query_labels), -1) / 255.0 @ projection
  ways = episode.class_mask.shape[0]
  protos = np.stack([support[episode.support_labels == c].mean(0) for c in range(ways)])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = protonet.COSINE_SCALE * unit(query) @ unit(protos).T
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -log_p[np.arange(len(query)), episode.query_labels].mean()
  acc = (logits.argmax(-1) == episode.query_labels).mean()
  return protos, logits, loss, acc


def test_padding_does_not_change_the_protonet_numbers():
  source = make_source(seed=9, two_domains=False)
  projection = jax.random.normal(jax.random.key(0), (SIZE * SIZE * 3, 16))
  checked = 0
  for i in range(3):
    _, plan = source.plan(i)
    exact = ep.materialize(plan, source.domains[0].read, SIZE,
                           (plan.ways, plan.num_support, plan.num_query))
    padded = ep.pad(exact, (plan.ways + 4, plan.num_support + 9, plan.num_query + 7))
    bucketed = source.episode(i)
    ref = reference_head(exact, projection)
    protos, logits, loss, acc = head(exact, projection)
    np.testing.assert_allclose(protos, ref[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, ref[1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loss, ref[2], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(acc, ref[3], atol=1e-6)
    assert float(loss) > 0.01
    for other in (padded, bucketed):
      p_protos, p_logits, p_loss, p_acc = head(other, projection)
      np.testing.assert_allclose(p_protos[:plan.ways], protos, atol=1e-5)
      np.testing.assert_allclose(p_protos[plan.ways:], 0.0, atol=0)
      np.testing.assert_allclose(p_logits[:plan.num_query, :plan.ways], logits, atol=1e-5)
      assert (np.asarray(p_logits[:, plan.ways:]) < -1e8).all()
      np.testing.assert_allclose(p_loss, loss, atol=1e-5)
      np.testing.assert_allclose(p_acc, acc, atol=1e-5)
    checked += 1
  assert checked == 3


def test_jit_compiles_once_per_bucket():
  source = make_source(seed=10, two_domains=False)
  projection = jax.random.normal(jax.random.key(1), (SIZE * SIZE * 3, 8))
  traces = []

  def loss_fn(episode):
    traces.append(episode.shape_key)
    return head(episode, projection)[2]

  step = jax.jit(chex.assert_max_traces(loss_fn, n=source.buckets.count))
  keys, losses = set(), []
  for i in range(50):
    episode = source.episode(i)
    keys.add(episode.shape_key)
    losses.append(float(step(episode)))
  assert len(traces) == len(keys) < 50
  assert len(keys) >= 2
  assert len(set(traces)) == len(traces)
  assert np.all(np.isfinite(losses)) and np.std(losses) > 0


def test_process_slices_union_to_the_full_batch():
  source = make_source(seed=11)
  full = loader.BatchSource(source, 4)
  parts = [loader.BatchSource(source, 4, process_index=p, process_count=2) for p in range(2)]
  for b in range(3):
    whole = unstack(full(b))
    sliced = unstack(parts[0](b)) + unstack(parts[1](b))
    assert len(sliced) == len(whole) == 4
    for task, expected in zip(sliced, whole):
      assert_episodes_equal(ep.pad(task, expected.shape_key), expected)
    local_images = sorted(decode(np.concatenate(
        [t.support_images[t.support_mask] for t in sliced])).tolist())
    whole_images = sorted(decode(np.concatenate(
        [t.support_images[t.support_mask] for t in whole])).tolist())
    assert local_images == whole_images
  with pytest.raises(DataError, match="not divisible by 3"):
    loader.BatchSource(source, 4, process_count=3)


# ----------------------------------------------------------------------------- test images


def test_resize_and_centre_crop_known_answers():
  """ratio > 1: shorter side to round(ratio · size), aspect kept, central size × size crop."""
  square = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  np.testing.assert_array_equal(ep.resize(square, 2, 2.0), square[1:3, 1:3])  # 4 px: no resampling
  wide = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
  np.testing.assert_array_equal(ep.resize(wide, 2, 2.0), wide[1:3, 3:5])
  tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
  np.testing.assert_array_equal(ep.resize(tall, 2, 2.0), tall[3:5, 1:3])
  image = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
  # 128 px: resize 146, crop 9 px each side; 32 px: resize round(36.5) = 36, crop 2 px.
  np.testing.assert_array_equal(ep.resize(image, 128, ep.TEST_RESIZE_RATIO),
                                ep.resize(image, 146)[9:137, 9:137])
  np.testing.assert_array_equal(ep.resize(image, 32, ep.TEST_RESIZE_RATIO),
                                ep.resize(image, 36)[2:34, 2:34])
  np.testing.assert_array_equal(ep.resize(image, 32, 1.0), ep.resize(image, 32))  # 1: no crop
  assert ep.resize(image, 50) is image


def test_test_resize_ratio_applies_to_val_and_test_episodes_only():
  from smat.meta import defaults

  config = defaults.base()
  config.data.sampler, config.data.ways, config.data.shots, config.data.queries = "fixed", 3, 1, 1
  config.data.image_size = SIZE
  config.data.test_resize_ratio = 1.5
  domain = make_domain("north", 0)
  val = loader.episode_source(config, "val", domains=[domain])
  train = loader.episode_source(config, "train", domains=[domain])
  assert (val.resize_ratio, train.resize_ratio) == (1.5, 1.0)
  _, plan = val.plan(0)
  episode = val.episode(0)
  first = int(plan.support[0][0])
  np.testing.assert_array_equal(episode.support_images[0],
                                ep.resize(domain.read(first), SIZE, 1.5))
  np.testing.assert_array_equal(episode.support_images[0],
                                ep.resize(domain.read(first), 12)[2:10, 2:10])
  _, plan = train.plan(0)
  first = int(plan.support[0][0])
  np.testing.assert_array_equal(train.episode(0).support_images[0], domain.read(first))
  config.data.test_resize_ratio = 0.5
  with pytest.raises(DataError, match="data.test_resize_ratio=0.5: .* ratio ≥ 1"):
    loader.episode_source(config, "val", domains=[domain])


def test_val_and_test_images_are_centre_cropped_by_default():
  domain = make_domain("north", 0)
  fixed = FixedSampler(3, 1, 1)
  val = loader.EpisodeSource((domain,), "val", fixed, SIZE)
  train = loader.EpisodeSource((domain,), "train", fixed, SIZE)
  assert (val.resize_ratio, train.resize_ratio) == (ep.TEST_RESIZE_RATIO, 1.0)
  assert ep.split_resize_ratio("test") == 146 / 128 and ep.split_resize_ratio("test", 1.0) == 1.0
  _, plan = val.plan(0)
  first = int(plan.support[0][0])
  # 8 px: resize to round(9.125) = 9, crop rows/columns round(0.5) = 0 … 8.
  np.testing.assert_array_equal(val.episode(0).support_images[0],
                                ep.resize(domain.read(first), 9)[0:8, 0:8])
