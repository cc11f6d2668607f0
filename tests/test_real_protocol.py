"""The paper's protocol end to end at toy size, stage by stage as docs/real-data.md runs it:
meta-train the Meta-Dataset config on the 8 training sources, `smat evaluate` its benchmark's
10 test sources by default, and the paper's table from `experiments.tables --rows run` — on
P>M>F's .h5 layout (fixture files) and on the TFDS builders' layout (TFDS's mocks)."""

import json

import numpy as np
import pytest

import md_fixtures
from experiments import tables
from smat import cli
from smat.data import spec as spec_lib
from smat.data.sources import tfds_source

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

SOURCES = tfds_source.ID_SOURCES + ("traffic_sign", "mscoco")
# Toy size: a 16-px one-block backbone; the smoke variant's 2 epochs of 2 updates, with
# Meta-Dataset's variable-way variable-shot episodes (5 ways, supports of at most 10).
TOY = ["--config.data.image_size=16", "--config.data.sampler=md", "--config.data.max_ways=5",
       "--config.data.max_support=10", "--config.data.max_query_per_class=2"]


def run_the_paper(config: str, backbone, tmp_path, expected_specs) -> dict:
  """meta-train → evaluate (default domains) → the paper's table; checks every stage's output
  names the 8 ID and 2 OOD test sources, and that the table's cells are evaluate's numbers."""
  workdir = tmp_path / "smat"
  assert cli.main(["meta-train", "--config", config, "--workdir", str(workdir),
                   f"--config.backbone.path={backbone}", *TOY]) == 0
  validation = json.loads((workdir / "validation.json").read_text())
  assert [h["step"] for h in validation] == [2, 4]
  assert sorted(validation[-1]["per_source"]) == sorted(expected_specs[:8])

  out = tmp_path / "md_test.json"
  assert cli.main(["evaluate", "--workdir", str(workdir), "--sampler", "md", "--episodes", "3",
                   "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  assert list(result["domains"]) == expected_specs
  assert result["id_domains"] == expected_specs[:8]
  assert result["ood_domains"] == expected_specs[8:]
  for r in result["domains"].values():
    assert r["episodes"] == 3 and r["ways_mean"] == 5 and 0 <= r["accuracy"] <= 100

  table = tmp_path / "table"
  assert tables.main(["--backbone", str(backbone), "--runs", f"smat={workdir}", "--rows", "run",
                      "--sampler", "md", "--modes", "zero-shot", "--methods", "pre,smat",
                      "--episodes", "3", "--out", str(table)]) == 0
  saved = json.loads(table.with_suffix(".json").read_text())
  assert (saved["id"], saved["ood"]) == (expected_specs[:8], expected_specs[8:])
  for spec in expected_specs:  # the same episodes as evaluate's: the same numbers
    assert saved["cells"]["SMAT"][spec]["per_episode"] == result["domains"][spec]["per_episode"]
  text = table.with_suffix(".md").read_text()
  assert "Meta-Dataset variable-way variable-shot" in text
  for spec in expected_specs[:8]:
    assert f"| {spec} (ID) |" in text
  for spec in expected_specs[8:]:
    assert f"| {spec} (OOD) |" in text
  averages = [line for line in text.splitlines() if line.startswith("| **ID average**")]
  smat_id = np.mean([result["domains"][s]["accuracy"] for s in expected_specs[:8]])
  assert averages and f"**{smat_id:.2f}**" in averages[0]
  return result


def test_the_paper_on_pmfs_h5_files(backbone, tmp_path, monkeypatch):
  root = md_fixtures.write_meta_dataset(tmp_path / "md_h5")
  monkeypatch.setenv("SMAT_MD_H5_DIR", str(root))
  run_the_paper("smat_vits16_md:h5,smoke", backbone, tmp_path,
                [f"md_h5:{root}:{s}" for s in SOURCES])


def fake_meta_dataset_builder(tfds, counts: dict, images: int, alphabet_size: int):
  """A `meta_dataset` builder with one config per source, as the Meta-Dataset project's TFDS
  builders (`meta_dataset/<source>`, one split `all_classes`, labels train → valid → test;
  Omniglot's records carry their alphabet). Defined unregistered: the test registers it."""

  class MetaDataset(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s) for s in counts]

    def _info(self):
      source = self.builder_config.name
      features = {"image": tfds.features.Image(shape=(None, None, 3)),
                  "label": tfds.features.ClassLabel(num_classes=sum(counts[source]))}
      if source == "omniglot":
        features["alphabet"] = tfds.features.ClassLabel(num_classes=4)
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      raise AssertionError("nothing is built or downloaded")

    def _generate_examples(self):
      raise AssertionError("nothing is built or downloaded")

  def as_data_source(builder, split, **kwargs):
    """TFDS's mock in place of the prepared files: `images` records per class, its pixels from
    TFDS's fake generator for the builder's features, labels and alphabets in order."""
    from tensorflow_datasets.testing import mocking

    assert split == "all_classes"
    source = builder.builder_config.name
    n = sum(counts[source]) * images
    fake = mocking.RandomFakeGenerator(builder.info.features, n, seed=len(source))
    out = []
    for i in range(n):
      record = dict(fake[i])
      record["image"] = np.asarray(record["image"])[:17, :17]
      record["label"] = i // images
      if source == "omniglot":
        record["alphabet"] = i // images // alphabet_size
      out.append(record)
    return out

  return MetaDataset, as_data_source


def test_the_paper_on_the_tfds_builders(backbone, tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from tensorflow_datasets.core import registered

  k = 5
  counts = {s: (k, k, k) for s in tfds_source.ID_SOURCES}
  counts.update(ilsvrc_2012=(k + 1, k, k), omniglot=(2 * k, k, k), traffic_sign=(0, 0, k),
                mscoco=(0, k, k))
  for source, count in counts.items():  # Meta-Dataset's class counts at toy size
    builder, splits, _ = tfds_source.MD_SOURCES[source]
    monkeypatch.setitem(tfds_source.MD_SOURCES, source, (builder, splits, count))
  # ImageNet's class DAG, in the prepared builder's metadata.json as Meta-Dataset writes it.
  spec = md_fixtures.hierarchical_spec([6] * (3 * k + 1), k + 1, k, k,
                                       {"a": range(k), "b": range(1, k + 1)})
  spec["class_names"] = {str(i): f"n{i:08d}" for i in range(3 * k + 1)}
  version = tmp_path / "tfds" / "meta_dataset" / "ilsvrc_2012" / "1.0.0"
  version.mkdir(parents=True)
  (version / "metadata.json").write_text(json.dumps({"dataset_specs": {"v1": spec}}))
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  with registered.skip_registration():
    builder, as_data_source = fake_meta_dataset_builder(tfds, counts, images=6, alphabet_size=k)
  monkeypatch.setitem(registered._DATASET_REGISTRY, "meta_dataset", builder)
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    result = run_the_paper("smat_vits16_md:smoke", backbone, tmp_path,
                           [f"tfds:meta_dataset/{s}" for s in SOURCES])
    # What the run read: Meta-Dataset's class counts, ImageNet's DAG, Omniglot's alphabets.
    imagenet = spec_lib.load_domain("tfds:meta_dataset/ilsvrc_2012")
    assert [len(imagenet.classes(s)) for s in ("train", "val", "test")] == [k + 1, k, k]
    assert [s.tolist() for s in imagenet.spans("train")] == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5],
                                                             [0, 1, 2, 3, 4, 5]]
    omniglot = spec_lib.load_domain("tfds:meta_dataset/omniglot")
    assert [c.group for c in omniglot.classes("train")] == ["alphabet0"] * k + ["alphabet1"] * k
  assert (tmp_path / "tfds" / "smat_index" / "meta_dataset_omniglot__all_classes.npz").is_file()
  assert result["domains"]["tfds:meta_dataset/ilsvrc_2012"]["episodes"] == 3
