"""Each data source on a small fixture written in tmp_path: TFDS (mocked), P>M>F .h5, image
folders, Fashion-MNIST IDX files; SPEC parsing; sampler checks on bad input."""

import gzip
import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smat.data import spec as spec_lib
from smat.data.loader import EpisodeSource
from smat.data.samplers import FixedSampler, MetaDatasetSampler
from smat.data.sources import fashion_mnist, folder, md_h5, tfds_source
from smat.errors import DataError, SamplerError

from md_fixtures import pixels, write_md_h5

STRIDE = 1 << 40  # tfds_source: image id = split position · stride + record index


# --- TFDS (mocked: tfds.testing.mock_data, no TensorFlow, nothing downloaded) --------------------


@pytest.fixture(scope="module")
def tfds():
  import tensorflow_datasets

  return tensorflow_datasets


def split_aware(num_examples):
  """`as_data_source_fn` whose random records depend on the split.

  The stock mock draws every split from one seed, so `train` and `test` would hold the same
  records (and the same labels); real TFDS splits differ.
  """
  from tensorflow_datasets.testing import mocking

  def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
    generator = mocking.RandomFakeGenerator(builder.info.features, num_examples,
                                            seed=zlib.crc32(split.encode()))
    return [generator[i] for i in range(num_examples)]

  return as_data_source


def records(tfds, name, splits, data_dir):
  return [tfds.data_source(name, split=s, data_dir=str(data_dir)) for s in splits]


def record_of(sources, image_id):
  return sources[int(image_id) // STRIDE][int(image_id) % STRIDE]


def names(domain, split):
  return [c.name for c in domain.classes(split)]


def test_tfds_plain_dataset_is_all_test_classes(tfds, tmp_path):
  """tfds:mnist: one class per label of the `test` split, pixels as uint8 RGB [H, W, 3]."""
  with tfds.testing.mock_data(num_examples=24):
    domain = tfds_source.load("mnist", data_dir=str(tmp_path))
    (test_records,) = records(tfds, "mnist", ("test",), tmp_path)
    labels = [int(test_records[i]["label"]) for i in range(len(test_records))]
    assert domain.classes("train") == () and domain.classes("val") == ()
    test = domain.classes("test")
    assert names(domain, "test") == [f"mnist/{k}" for k in sorted(set(labels))]
    assert sum(c.size for c in test) == 24
    for c in test:
      assert c.group == ""
      assert {labels[i] for i in c.image_ids} == {int(c.name.split("/")[1])}
    image_id = int(test[-1].image_ids[-1])
    image = domain.read(image_id)
    raw = np.asarray(test_records[image_id]["image"])
    assert raw.shape == (28, 28, 1)
    assert image.dtype == np.uint8 and image.shape == (28, 28, 3)
    np.testing.assert_array_equal(image, np.repeat(raw, 3, axis=-1))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(domain.read))(image_id), image)
  assert domain.name == "tfds:mnist"
  assert domain.metadata == {"source": "tfds", "builder": "mnist", "tfds_splits": ["test"],
                             "md_source": None}


def test_tfds_spec_with_explicit_split_uses_tfds_data_dir(tfds, tmp_path, monkeypatch):
  """`tfds:<name>:<split>` through load_domain reads that split and caches under TFDS_DATA_DIR."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with tfds.testing.mock_data(num_examples=10):
    domain = spec_lib.load_domain("tfds:mnist:train")
    assert domain.name == "tfds:mnist:train"
    assert domain.metadata["tfds_splits"] == ["train"]
    assert sum(c.size for c in domain.classes("test")) == 10
    assert domain.read(int(domain.classes("test")[0].image_ids[0])).shape == (28, 28, 3)
  assert (tmp_path / "smat_index" / "mnist__train.npz").is_file()


def test_tfds_md_source_cu_birds_splits(tfds, tmp_path):
  """tfds:cu_birds reads caltech_birds2011 train+test and cuts classes by MD's 140/30/30."""
  n = 40
  with tfds.testing.mock_data(num_examples=n, as_data_source_fn=split_aware(n)):
    domain = tfds_source.load("cu_birds", data_dir=str(tmp_path), seed=0)
    again = tfds_source.load("cu_birds", data_dir=str(tmp_path), seed=0)
    other_seed = tfds_source.load("cu_birds", data_dir=str(tmp_path), seed=1)
    sources = records(tfds, "caltech_birds2011", ("train", "test"), tmp_path)
    labels = {int(r["label"]) for s in sources for r in s}
    train, val, test = (set(names(domain, s)) for s in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val or train & test or val & test)
    assert train | val | test == {f"cu_birds/{k}" for k in labels}
    assert len(train) == round(len(labels) * 140 / 200)
    assert len(val) == round(len(labels) * 30 / 200)
    total = 0
    for split in ("train", "val", "test"):
      for c in domain.classes(split):
        total += c.size
        assert {int(record_of(sources, i)["label"]) for i in c.image_ids} == {
            int(c.name.split("/")[1])}
    assert total == 2 * n
    image_id = int(domain.classes("test")[0].image_ids[0])
    image = domain.read(image_id)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    np.testing.assert_array_equal(image, np.asarray(record_of(sources, image_id)["image"]))
  assert {s: names(again, s) for s in ("train", "val", "test")} == {
      s: names(domain, s) for s in ("train", "val", "test")}
  assert names(other_seed, "train") != names(domain, "train")
  assert domain.metadata == {"source": "tfds", "builder": "caltech_birds2011",
                             "tfds_splits": ["train", "test"], "md_source": "cu_birds"}


def test_tfds_md_source_omniglot_test_is_evaluation_split(tfds, tmp_path):
  """tfds:omniglot: test classes are exactly the TFDS `test` labels; classes carry alphabets."""
  n = 40
  with tfds.testing.mock_data(num_examples=n, as_data_source_fn=split_aware(n)):
    domain = tfds_source.load("omniglot", data_dir=str(tmp_path))
    sources = records(tfds, "omniglot", ("train", "test"), tmp_path)
    test_labels = {int(r["label"]) for r in sources[1]}
    all_labels = test_labels | {int(r["label"]) for r in sources[0]}
    train, val, test = (set(names(domain, s)) for s in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val or train & test or val & test)
    assert test == {f"omniglot/{k}" for k in test_labels}
    assert train | val == {f"omniglot/{k}" for k in all_labels - test_labels}
    assert len(train) == round(len(all_labels - test_labels) * 883 / 964)
    for split in ("train", "val", "test"):
      for c in domain.classes(split):
        first = record_of(sources, c.image_ids[0])
        assert c.group == f"alphabet{int(first['alphabet'])}"
        assert {int(record_of(sources, i)["label"]) for i in c.image_ids} == {
            int(c.name.split("/")[1])}
    image = domain.read(int(domain.classes("test")[0].image_ids[0]))
    assert image.dtype == np.uint8 and image.shape == (105, 105, 3)
    groups = domain.describe()["splits"]["test"]["groups"]
    assert groups and all(g.startswith("alphabet") for g in groups)
  assert (tmp_path / "smat_index" / "omniglot__train+test.npz").is_file()


def test_tfds_label_scan_is_cached_and_reused(tfds, tmp_path):
  """The scan lands in <data_dir>/smat_index/ and a second load reads it instead of rescanning."""
  with tfds.testing.mock_data(num_examples=12):
    first = tfds_source.load("mnist", data_dir=str(tmp_path))
    (test_records,) = records(tfds, "mnist", ("test",), tmp_path)
    cache = tmp_path / "smat_index" / "mnist__test.npz"
    assert sorted(p.name for p in cache.parent.iterdir()) == ["mnist__test.npz"]
    with np.load(cache) as f:
      np.testing.assert_array_equal(f["ids"], np.arange(12))
      np.testing.assert_array_equal(f["labels"], [int(r["label"]) for r in test_records])
      np.testing.assert_array_equal(f["groups"], np.full(12, -1))
    assert len(first.classes("test")) > 1
    np.savez(cache, ids=np.arange(12), labels=np.full(12, 7), groups=np.full(12, -1))
    second = tfds_source.load("mnist", data_dir=str(tmp_path))
  assert names(second, "test") == ["mnist/7"]
  assert second.classes("test")[0].size == 12


def test_tfds_errors_are_data_errors(tfds, tmp_path):
  """Unknown, unprepared or unreadable datasets give a DataError; nothing is downloaded."""
  with pytest.raises(DataError, match="no such TFDS dataset"):
    tfds_source.load("no_such_dataset_xyz", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="no prepared files under"):
    tfds_source.load("no_such_dataset_xyz:test", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"tfds build mnist --file_format=array_record"):
    tfds_source.load("mnist:test", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"choose from \['aircraft'"):
    tfds_source.load("meta_dataset/no_such_source", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=re.escape(str(tmp_path / "meta_dataset" / "aircraft"))):
    tfds_source.load("aircraft", data_dir=str(tmp_path))
  (tmp_path / "meta_dataset" / "aircraft" / "1.0.0").mkdir(parents=True)
  with pytest.raises(DataError, match="dataset_info.json"):
    tfds_source.load("aircraft", data_dir=str(tmp_path))
  assert not (tmp_path / "downloads").exists()
  assert not list(tmp_path.glob("mnist/*/*.array_record*"))


# --- P>M>F Meta-Dataset .h5 ------------------------------------------------------------------------


def test_md_h5_splits_and_pixels(tmp_path):
  """classes_per_split gives contiguous train → valid → test ids; read() returns the written pixels."""
  sizes = [3, 4, 2, 5, 3, 2]
  write_md_h5(tmp_path, "cu_birds", sizes,
              {"classes_per_split": {"TRAIN": 3, "VALID": 2, "TEST": 1}})
  domain = spec_lib.load_domain(f"md_h5:{tmp_path}:cu_birds")
  assert domain.name == f"md_h5:{tmp_path}:cu_birds"
  assert names(domain, "train") == ["n00000000", "n00000001", "n00000002"]
  assert names(domain, "val") == ["n00000003", "n00000004"]
  assert names(domain, "test") == ["n00000005"]
  classes = [c for s in ("train", "val", "test") for c in domain.classes(s)]
  assert [c.size for c in classes] == sizes
  assert all(c.group == "" for c in classes)
  for class_id, c in enumerate(classes):
    for j, image_id in enumerate(c.image_ids):
      image = domain.read(int(image_id))
      assert image.dtype == np.uint8 and image.shape == (6 + class_id, 9, 3)
      np.testing.assert_array_equal(image, pixels(class_id, j))
  reader = pickle.loads(pickle.dumps(domain.read))
  np.testing.assert_array_equal(reader(int(classes[4].image_ids[2])), pixels(4, 2))
  assert domain.metadata["md_source"] == "cu_birds"


def test_md_h5_bilevel_spec_gives_groups(tmp_path):
  """Omniglot's bi-level spec: superclasses per split, classes per superclass → named groups."""
  layout = {"superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
            "classes_per_superclass": {"0": 2, "1": 3, "2": 1, "3": 2},
            "superclass_names": {"0": "Latin", "1": "Greek", "2": "Korean", "3": "Tibetan"}}
  write_md_h5(tmp_path, "omniglot", [2] * 8, layout)
  domain = md_h5.load(str(tmp_path), "omniglot")
  groups = {s: [c.group for c in domain.classes(s)] for s in ("train", "val", "test")}
  assert groups == {"train": ["Latin", "Latin", "Greek", "Greek", "Greek"], "val": ["Korean"],
                    "test": ["Tibetan", "Tibetan"]}
  assert names(domain, "test") == ["n00000006", "n00000007"]
  np.testing.assert_array_equal(domain.read(int(domain.classes("test")[1].image_ids[1])),
                                pixels(7, 1))
  assert domain.describe()["splits"]["train"]["groups"] == ["Greek", "Latin"]


def imagenet_like_spec(images):
  """Meta-Dataset's hierarchical spec for 15 classes n0..n14: TRAIN r → a (n0..n5), b (n3..n7);
  VALID r → d (n8..n12); TEST r → n13, n14. Synset `r` has other children in each split."""
  wn = lambda i: f"n{i:08d}"
  node = lambda w, children: {"wn_id": w, "words": w, "children_ids": children, "parents_ids": []}
  leaf = lambda i: node(wn(i), [])
  subgraphs = {
      "TRAIN": [node("r", ["a", "b"]), node("a", [wn(i) for i in range(6)]),
                node("b", [wn(i) for i in range(3, 8)])] + [leaf(i) for i in range(8)],
      "VALID": [node("r", ["d"]), node("d", [wn(i) for i in range(8, 13)])]
               + [leaf(i) for i in range(8, 13)],
      "TEST": [node("r", [wn(13), wn(14)]), leaf(13), leaf(14)],
  }
  per_split = {"TRAIN": range(8), "VALID": range(8, 13), "TEST": range(13, 15)}
  return {"__class__": "HierarchicalDatasetSpecification", "split_subgraphs": subgraphs,
          "images_per_class": {k: {wn(i): images[i] for i in ids} for k, ids in per_split.items()}}


def test_md_h5_hierarchical_spec_gives_classes_and_hierarchy(tmp_path):
  """ImageNet's spec: each split's WordNet leaves are its classes; its DAG the domain's hierarchy."""
  sizes = [3 + i % 4 for i in range(15)]
  write_md_h5(tmp_path, "ilsvrc_2012", sizes, imagenet_like_spec(sizes))
  domain = md_h5.load(str(tmp_path), "ilsvrc_2012")
  assert names(domain, "train") == [f"n{i:08d}" for i in range(8)]
  assert names(domain, "val") == [f"n{i:08d}" for i in range(8, 13)]
  assert names(domain, "test") == ["n00000013", "n00000014"]
  assert [c.size for s in ("train", "val", "test") for c in domain.classes(s)] == sizes
  np.testing.assert_array_equal(domain.read(int(domain.classes("val")[1].image_ids[2])),
                                pixels(9, 2))
  assert domain.hierarchy["TRAIN:r"] == ("TRAIN:a", "TRAIN:b")
  assert domain.hierarchy["VALID:d"] == tuple(f"n{i:08d}" for i in range(8, 13))
  assert [s.tolist() for s in domain.spans("train")] == [list(range(6)), list(range(3, 8)),
                                                         list(range(8))]  # a, b, r
  assert [s.tolist() for s in domain.spans("val")] == [list(range(5))] * 2  # d, r
  source = EpisodeSource((domain,), "train", MetaDatasetSampler(max_ways=8, max_support=20),
                         image_size=8)
  for i in range(30):
    chosen = set(source.plan(i)[1].classes.tolist())
    assert chosen in ({0, 1, 2, 3, 4, 5}, {3, 4, 5, 6, 7}, set(range(8)))


def test_md_h5_hierarchy_json_beside_the_spec(tmp_path):
  """A flat spec plus hierarchy.json (leaves = class names) → the domain's hierarchy."""
  directory = write_md_h5(tmp_path, "aircraft", [2] * 7,
                          {"classes_per_split": {"TRAIN": 5, "VALID": 1, "TEST": 1}})
  (directory / "hierarchy.json").write_text(json.dumps(
      {"maker": ["n00000000", "n00000001", "n00000002", "n00000003", "n00000004"]}))
  domain = md_h5.load(str(tmp_path), "aircraft")
  assert [s.tolist() for s in domain.spans("train")] == [[0, 1, 2, 3, 4]]
  assert domain.spans("val") == ()
  (directory / "hierarchy.json").write_text(json.dumps(["not", "a", "dag"]))
  with pytest.raises(DataError, match="hierarchy.json: expected"):
    md_h5.load(str(tmp_path), "aircraft")


def test_tfds_md_hierarchy_from_the_builder_metadata(tmp_path):
  """meta_dataset/ilsvrc_2012: the spec in the prepared builder's metadata.json, leaves renamed
  to the domain's class names; no metadata → no hierarchy."""
  assert tfds_source.md_hierarchy("ilsvrc_2012", str(tmp_path), range(15)) == {}
  spec = imagenet_like_spec([3] * 15)
  spec["class_names"] = {str(i): f"n{i:08d}" for i in range(15)}
  version = tmp_path / "meta_dataset" / "ilsvrc_2012" / "1.0.0"
  version.mkdir(parents=True)
  (version / "metadata.json").write_text(json.dumps({"dataset_specs": {"v1": spec}}))
  dag = tfds_source.md_hierarchy("ilsvrc_2012", str(tmp_path), range(15))
  assert dag["TRAIN:a"] == tuple(f"ilsvrc_2012/{i}" for i in range(6))
  assert dag["TEST:r"] == ("ilsvrc_2012/13", "ilsvrc_2012/14")


def test_md_h5_errors_name_the_file(tmp_path):
  """Missing spec, missing class file and unreadable image → DataError naming the path."""
  with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope" / "dataset_spec.json"))):
    md_h5.load(str(tmp_path), "nope")
  directory = write_md_h5(tmp_path, "dtd", [2, 2, 2],
                          {"classes_per_split": {"TRAIN": 1, "VALID": 1, "TEST": 1}})
  domain = md_h5.load(str(tmp_path), "dtd")
  with pytest.raises(DataError, match=re.escape(str(directory / "1.h5"))):
    domain.read(int(domain.classes("val")[0].image_ids[0]) + 5)
  (directory / "1.h5").unlink()
  with pytest.raises(DataError, match=re.escape(str(directory / "1.h5"))):
    spec_lib.load_domain(f"md_h5:{tmp_path}:dtd")
  (directory / "dataset_spec.json").write_text("{not json")
  with pytest.raises(DataError, match="dataset_spec.json: not valid JSON"):
    md_h5.load(str(tmp_path), "dtd")
  (directory / "dataset_spec.json").write_text(json.dumps({"classes_per_split": {}}))
  with pytest.raises(DataError, match="images_per_class"):
    md_h5.load(str(tmp_path), "dtd")


# --- Image folder ----------------------------------------------------------------------------------


def test_folder_reads_every_mode_as_rgb(tmp_path):
  """PNG/JPEG in RGB, L, RGBA, P (with and without transparency), LA, 16-bit, CMYK → uint8 RGB."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (6, 4), dtype=np.uint8)
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[:, :2] = (10, 20, 30, 255)
  rgba[:, 2:] = (200, 0, 0, 0)
  indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
  palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
  deep = np.array([[0, 65535], [13107, 52428]], np.uint16)
  for name in ("color", "gray", "alpha", "palette", "deep"):
    (tmp_path / name).mkdir()
  Image.fromarray(rgb).save(tmp_path / "color" / "a.png")
  Image.new("RGB", (16, 16), (120, 60, 200)).save(tmp_path / "color" / "b.jpg", quality=95)
  Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "color" / "c.jpeg", quality=95)
  Image.fromarray(gray, "L").save(tmp_path / "gray" / "a.png")
  Image.fromarray(np.full((3, 3), 77, np.uint8), "L").save(tmp_path / "gray" / "b.jpg")
  Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha" / "a.png")
  Image.fromarray(np.full((2, 2, 2), (90, 0), np.uint8), "LA").save(tmp_path / "alpha" / "b.png")
  p = Image.fromarray(indices, "P")
  p.putpalette(palette)
  p.save(tmp_path / "palette" / "a.png")
  p.save(tmp_path / "palette" / "b.png", transparency=1)
  Image.fromarray(deep).save(tmp_path / "deep" / "a.png")
  (tmp_path / "deep" / "notes.txt").write_text("not an image")

  domain = spec_lib.load_domain(f"folder:{tmp_path}")
  assert domain.classes("train") == () and domain.classes("val") == ()
  assert names(domain, "test") == ["alpha", "color", "deep", "gray", "palette"]
  assert [c.size for c in domain.classes("test")] == [2, 3, 1, 2, 2]
  ids = np.concatenate([c.image_ids for c in domain.classes("test")])
  np.testing.assert_array_equal(ids, np.arange(10))
  assert domain.metadata["skipped_corrupt"] == 0
  read = {c.name: [domain.read(int(i)) for i in c.image_ids] for c in domain.classes("test")}
  for images in read.values():
    for image in images:
      assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3

  np.testing.assert_array_equal(read["color"][0], rgb)
  assert read["color"][1].shape == (16, 16, 3)
  assert np.abs(read["color"][1].astype(int) - (120, 60, 200)).max() <= 4
  assert read["color"][2].shape == (8, 8, 3)
  assert np.abs(read["color"][2].astype(int) - (255, 0, 0)).max() <= 4
  np.testing.assert_array_equal(read["gray"][0], np.repeat(gray[..., None], 3, axis=-1))
  assert np.abs(read["gray"][1].astype(int) - 77).max() <= 2
  np.testing.assert_array_equal(read["alpha"][0][:, :2], np.full((4, 2, 3), (10, 20, 30)))
  np.testing.assert_array_equal(read["alpha"][0][:, 2:], np.full((4, 2, 3), 255))
  np.testing.assert_array_equal(read["alpha"][1], np.full((2, 2, 3), 255))
  colors = np.array(palette[:9], np.uint8).reshape(3, 3)
  np.testing.assert_array_equal(read["palette"][0], colors[indices])
  np.testing.assert_array_equal(read["palette"][1][indices != 1], colors[indices][indices != 1])
  np.testing.assert_array_equal(read["palette"][1][indices == 1], np.full((2, 3), 255))
  deep_rgb = read["deep"][0]
  assert (deep_rgb == deep_rgb[..., :1]).all()
  assert deep_rgb[0, 0, 0] == 0 and deep_rgb[0, 1, 0] == 255
  assert abs(int(deep_rgb[1, 0, 0]) - 51) <= 1 and abs(int(deep_rgb[1, 1, 0]) - 204) <= 1


def test_folder_errors_name_the_path(tmp_path):
  """Missing folder, no class folders, empty class folder, corrupt image: DataError with the path."""
  missing = tmp_path / "missing"
  with pytest.raises(DataError, match=re.escape(f"folder:{missing}: directory does not exist")):
    folder.load(str(missing))
  root = tmp_path / "root"
  root.mkdir()
  with pytest.raises(DataError, match="no class sub-folders"):
    folder.load(str(root))
  (root / "cat").mkdir()
  Image.new("RGB", (4, 4), (1, 2, 3)).save(root / "cat" / "a.png")
  (root / "dog").mkdir()
  (root / "dog" / "readme.txt").write_text("no images here")
  with pytest.raises(DataError, match=re.escape(f"{root / 'dog'}: class folder has no readable images")):
    folder.load(str(root))
  Image.new("RGB", (4, 4), (9, 8, 7)).save(root / "dog" / "b.png")
  (root / "dog" / "x.png").write_bytes(b"\x89PNG garbage, not an image" * 4)
  with pytest.raises(DataError, match=re.escape(f"{root / 'dog' / 'x.png'}: unreadable or corrupt")):
    folder.load(str(root))


def test_folder_skip_corrupt(tmp_path):
  """skip_corrupt drops unreadable files (truncated ones included) and counts them."""
  for name, color in (("cat", (1, 2, 3)), ("dog", (9, 8, 7))):
    (tmp_path / name).mkdir()
    Image.new("RGB", (4, 4), color).save(tmp_path / name / "a.png")
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / "dog" / "y.jpg", quality=95)
  data = (tmp_path / "dog" / "y.jpg").read_bytes()
  (tmp_path / "dog" / "y.jpg").write_bytes(data[:len(data) // 2])
  with Image.open(tmp_path / "dog" / "y.jpg") as header_only:
    assert header_only.size == (64, 64)
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'dog' / 'y.jpg'}: unreadable or corrupt")):
    folder.load(str(tmp_path))
  (tmp_path / "dog" / "x.png").write_bytes(b"garbage bytes" * 10)
  domain = spec_lib.load_domain(f"folder:{tmp_path}", skip_corrupt=True)
  assert domain.metadata["skipped_corrupt"] == 2
  assert [(c.name, c.size) for c in domain.classes("test")] == [("cat", 1), ("dog", 1)]
  np.testing.assert_array_equal(domain.read(int(domain.classes("test")[1].image_ids[0])),
                                np.full((4, 4, 3), (9, 8, 7)))


# --- Fashion-MNIST ---------------------------------------------------------------------------------


def write_idx(path, array, magic, truncate=0):
  header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  body = array.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + body[:len(body) - truncate])


def fashion_fixture(directory, n=23):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = (np.arange(n) * 7) % 10
  write_idx(directory / "t10k-images-idx3-ubyte.gz", images, 0x00000803)
  write_idx(directory / "t10k-labels-idx1-ubyte.gz", labels, 0x00000801)
  return images, labels


def test_fashion_mnist_round_trip(tmp_path):
  """Labels become the 10 named classes; read() gives the written pixels as RGB."""
  images, labels = fashion_fixture(tmp_path)
  domain = fashion_mnist.load(str(tmp_path))
  assert domain.classes("train") == () and domain.classes("val") == ()
  test = domain.classes("test")
  assert [c.name for c in test] == list(fashion_mnist.CLASS_NAMES)
  for k, c in enumerate(test):
    np.testing.assert_array_equal(c.image_ids, np.flatnonzero(labels == k))
  for i in (0, 5, 22):
    image = domain.read(i)
    assert image.dtype == np.uint8 and image.shape == (28, 28, 3)
    np.testing.assert_array_equal(image, np.repeat(images[i][..., None], 3, axis=-1))
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(domain.read))(7), domain.read(7))


def test_fashion_mnist_spec_reads_env_dir(tmp_path, monkeypatch):
  _, labels = fashion_fixture(tmp_path, n=30)
  monkeypatch.setenv("SMAT_FASHION_MNIST_DIR", str(tmp_path))
  domain = spec_lib.load_domain("fashion_mnist")
  assert [c.size for c in domain.classes("test")] == [3] * 10
  assert domain.metadata["path"] == str(tmp_path)


def test_fashion_mnist_errors(tmp_path):
  """Missing directory names the Debian package; truncated or wrong files are DataErrors."""
  with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
    fashion_mnist.load(str(tmp_path / "missing"))
  labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
  fashion_fixture(tmp_path)
  write_idx(labels_path, np.arange(23) % 10, 0x00000801, truncate=3)
  with pytest.raises(DataError, match=re.escape(f"{labels_path}: truncated IDX file")):
    fashion_mnist.load(str(tmp_path))
  write_idx(labels_path, np.arange(23) % 10, 0x00000D01)
  with pytest.raises(DataError, match="bad magic"):
    fashion_mnist.load(str(tmp_path))
  images = np.zeros((23, 28, 28), np.uint8)
  write_idx(labels_path, np.arange(23) % 10, 0x00000801)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x00000803, truncate=100)
  with pytest.raises(DataError, match="truncated IDX file"):
    fashion_mnist.load(str(tmp_path)).read(0)


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEFAULT_DIR),
                    reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_installed_package():
  domain = fashion_mnist.load()
  assert [c.size for c in domain.classes("test")] == [1000] * 10
  image = domain.read(9999)
  assert image.shape == (28, 28, 3) and image.dtype == np.uint8 and image.max() > 0


# --- SPEC parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nope", "glyphs", "folder", "md_h5:only_one_part", "tfds", ""])
def test_unknown_spec_lists_forms(spec):
  with pytest.raises(DataError, match="unknown data SPEC") as info:
    spec_lib.load_domain(spec)
  for form in spec_lib.FORMS:
    assert form in str(info.value)


def test_spec_list_loads_each_domain_in_order(tmp_path, monkeypatch):
  for root, classes in (("a", ("x", "y")), ("b", ("z",))):
    for name in classes:
      (tmp_path / root / name).mkdir(parents=True)
      Image.new("RGB", (3, 3)).save(tmp_path / root / name / "0.png")
  fashion_fixture(tmp_path)
  monkeypatch.setenv("SMAT_FASHION_MNIST_DIR", str(tmp_path))
  domains = spec_lib.load_domains(f"folder:{tmp_path / 'b'}, fashion_mnist,folder:{tmp_path / 'a'},")
  assert [d.name for d in domains] == [f"folder:{tmp_path / 'b'}", "fashion_mnist",
                                       f"folder:{tmp_path / 'a'}"]
  assert [len(d.classes("test")) for d in domains] == [1, 10, 2]
  with pytest.raises(DataError, match="empty data SPEC"):
    spec_lib.load_domains(" , ")
  with pytest.raises(DataError, match="unknown data SPEC 'bogus'"):
    spec_lib.load_domains(f"folder:{tmp_path / 'a'},bogus")


# --- Sampler checks on bad input -------------------------------------------------------------------


def color_folder(root, sizes):
  """root/<class>/<i>.png, every image of class k one solid colour."""
  for k, (name, n) in enumerate(sizes.items()):
    (root / name).mkdir(parents=True)
    for i in range(n):
      Image.new("RGB", (5, 5), (40 * k, 255 - 40 * k, 7)).save(root / name / f"{i}.png")
  return folder.load(str(root))


def test_sampler_rejects_more_ways_than_classes(tmp_path):
  domain = color_folder(tmp_path, {"a": 4, "b": 4})
  with pytest.raises(SamplerError, match=r"3-way episodes need ≥ 3 classes, but it has 2"):
    EpisodeSource((domain,), "test", FixedSampler(ways=3, shots=1, queries=1), image_size=8)
  with pytest.raises(SamplerError, match=r"need ≥ 5 classes"):
    EpisodeSource((domain,), "test", MetaDatasetSampler(), image_size=8)
  with pytest.raises(DataError, match="no train classes"):
    EpisodeSource((domain,), "train", FixedSampler(ways=2, shots=1, queries=1), image_size=8)


def test_sampler_rejects_class_smaller_than_shots_plus_queries(tmp_path):
  domain = color_folder(tmp_path, {"big": 5, "small": 2, "tiny": 1})
  with pytest.raises(SamplerError, match=r"class 'small' has 2 images but 1-shot \+ 2-query needs 3"):
    EpisodeSource((domain,), "test", FixedSampler(ways=2, shots=1, queries=2), image_size=8)
  with pytest.raises(SamplerError, match=r"class 'tiny' has 1 image"):
    EpisodeSource((domain,), "test", MetaDatasetSampler(min_ways=2, within_group=False),
                  image_size=8)
  ok = color_folder(tmp_path / "ok", {"big": 5, "small": 2})
  source = EpisodeSource((ok,), "test", FixedSampler(ways=2, shots=1, queries=1), image_size=8)
  episode = source.episode(0)
  assert episode.support_images.shape == (2, 8, 8, 3)
  _, plan = source.plan(0)
  for label, position in enumerate(plan.classes):
    k = int(position)
    np.testing.assert_array_equal(episode.support_images[label],
                                  np.full((8, 8, 3), (40 * k, 255 - 40 * k, 7)))


# --- class splits for meta-training on your own data ----------------------------------------------


def _class_folder(root, groups=None, classes=10, per_class=2):
  """root/<class>/ (or root/<group>/<class>/ for each of `groups`) of tiny PNGs."""
  for group in groups or [None]:
    for c in range(classes):
      folder = root / group / f"c{c:02d}" if group else root / f"c{c:02d}"
      folder.mkdir(parents=True)
      for i in range(per_class):
        Image.new("RGB", (4, 4), (c * 20, i * 40, 0)).save(folder / f"{i}.png")
  return root


def _names(domain, split):
  return [c.name for c in domain.classes(split)]


def test_seeded_class_split_by_counts_and_shares(tmp_path):
  root = _class_folder(tmp_path / "data")
  domain = spec_lib.load_domain(f"folder:{root}?split=6/2/2")
  counts = [len(domain.classes(s)) for s in ("train", "val", "test")]
  assert counts == [6, 2, 2]
  every = sorted(n for s in ("train", "val", "test") for n in _names(domain, s))
  assert every == [f"c{c:02d}" for c in range(10)]  # disjoint and complete
  # The same seed draws the same split; the assignment is the seeded permutation of sorted names.
  again = spec_lib.load_domain(f"folder:{root}?split=6/2/2&seed=0")
  assert all(_names(again, s) == _names(domain, s) for s in ("train", "val", "test"))
  order = np.random.default_rng(0).permutation(10)
  assert sorted(_names(domain, "val")) == sorted(f"c{i:02d}" for i in order[6:8])
  other = spec_lib.load_domain(f"folder:{root}?split=6/2/2&seed=1")
  assert _names(other, "train") != _names(domain, "train")
  # Shares: 70/15/15 of 10 classes → round(7), round(1.5) = 2, the rest 1.
  shares = spec_lib.load_domain(f"folder:{root}?split=70/15/15")
  assert [len(shares.classes(s)) for s in ("train", "val", "test")] == [7, 2, 1]
  assert shares.name == f"folder:{root}?split=70/15/15"
  assert shares.metadata["class_split"]["train"] == 7
  # Without a split every class is a test class, as before.
  assert len(spec_lib.load_domain(f"folder:{root}").classes("test")) == 10


def test_split_file_and_its_errors(tmp_path):
  root = _class_folder(tmp_path / "data", classes=4)
  good = tmp_path / "split.json"
  good.write_text(json.dumps({"train": ["c00", "c01"], "val": ["c02"], "test": ["c03"]}))
  domain = spec_lib.load_domain(f"folder:{root}?split={good}")
  assert [_names(domain, s) for s in ("train", "val", "test")] == [["c00", "c01"], ["c02"], ["c03"]]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"train": ["c00", "c01", "zz"], "test": ["c01"]}))
  with pytest.raises(DataError) as info:
    spec_lib.load_domain(f"folder:{root}?split={bad}")
  message = str(info.value)
  assert "not in the data (1): zz" in message and "in no split (2): c02, c03" in message
  assert "in two splits (1): c01" in message


def test_packaged_cifar_fs_split_on_tfds_cifar100(tfds, tmp_path):
  """tfds:cifar100?split=cifar_fs: CIFAR-FS's published 64/16/20 classes, by CIFAR-100's fine
  labels (alphabetical: 2 baby, 5 bed, 8 bicycle test, 4 beaver validates, 0 apple trains)."""
  n = 300
  def every_label(builder, split, **kwargs):  # the mock's records, each label three times
    from tensorflow_datasets.testing import mocking

    fake = mocking.RandomFakeGenerator(builder.info.features, n, seed=0)
    return [{**fake[i], "label": i % 100} for i in range(n)]

  with tfds.testing.mock_data(num_examples=n, as_data_source_fn=every_label):
    domain = spec_lib.load_domain("tfds:cifar100:train?split=cifar_fs", str(tmp_path))
  counts = [len(domain.classes(s)) for s in ("train", "val", "test")]
  assert counts == [64, 16, 20]
  assert {"cifar100/2", "cifar100/5", "cifar100/8"} <= set(_names(domain, "test"))
  assert "cifar100/0" in _names(domain, "train") and "cifar100/4" in _names(domain, "val")
  assert all(c.size == 3 for s in ("train", "val", "test") for c in domain.classes(s))


def test_grouped_folders_split_whole_groups(tmp_path):
  root = _class_folder(tmp_path / "data", groups=["alpha", "beta", "gamma", "delta"], classes=3)
  domain = spec_lib.load_domain(f"folder:{root}?groups=dirs&split=2/1/1&by=group")
  groups = {s: {c.group for c in domain.classes(s)} for s in ("train", "val", "test")}
  assert [len(groups[s]) for s in ("train", "val", "test")] == [2, 1, 1]
  assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
  assert all(c.name == f"{c.group}/{c.name.split('/')[1]}" for c in domain.classes("train"))
  assert len(domain.classes("train")) == 6  # every class of the two training groups
  by_class = spec_lib.load_domain(f"folder:{root}?groups=dirs&split=6/3/3")
  assert [len(by_class.classes(s)) for s in ("train", "val", "test")] == [6, 3, 3]


@pytest.mark.parametrize("options, expected", [
    ("?split=1/2", "three non-negative numbers"),
    ("?split=0/5/5", "leaves 0 of 10 to train"),
    ("?splitt=7/2/1", "unknown option(s) splitt"),
    ("?seed=3", "add split=TRAIN/VAL/TEST"),
    ("?split=7/2/1&by=group", "by=group needs a group for every class"),
    ("?split=7/2/1&seed=x", "seed=x"),
    ("?groups=flat&split=7/2/1", "groups=flat"),
])
def test_class_split_errors_name_the_option(tmp_path, options, expected):
  root = _class_folder(tmp_path / "data")
  with pytest.raises(DataError) as info:
    spec_lib.load_domain(f"folder:{root}{options}")
  assert expected in str(info.value)


def test_class_split_options_only_for_folder_and_tfds():
  with pytest.raises(DataError, match="for folder: and tfds: domains"):
    spec_lib.load_domain("glyphs:id?split=7/2/1")
