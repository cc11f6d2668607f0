"""The emoji source on a fixture: two small npm tarballs laid out as emoji-datasource ships them
(package.json, emoji.json, img/<set>/64/*.png), built, read back as domains and through SPECs."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from smat import cli
from smat.data import spec as spec_lib
from smat.data.sources import emoji
from smat.errors import DataError

SETS = ("google", "twitter")
PER_CATEGORY = 20


def entries():
  """20 smileys (2 subcategories), 20 flags, one Component swatch, and one smiley Twitter
  does not draw (has_img_twitter false, though a fallback file is shipped)."""
  out = []
  for i in range(PER_CATEGORY):
    out.append({"unified": f"1F6{i:02X}", "image": f"1f6{i:02x}.png", "short_name": f"smile{i}",
                "category": "Smileys & Emotion", "subcategory": "face-smiling" if i < 10 else
                "face-hand", "sort_order": i})
    out.append({"unified": f"1F1E6-1F1{i:02X}", "image": f"1f1e6-1f1{i:02x}.png",
                "short_name": f"flag{i}", "category": "Flags", "subcategory": "country-flag",
                "sort_order": 100 + i})
  out.append({"unified": "1F3FB", "image": "1f3fb.png", "short_name": "skin-tone-2",
              "category": "Component", "subcategory": "skin-tone", "sort_order": 200})
  out.append({"unified": "1F9FF", "image": "1f9ff.png", "short_name": "nazar",
              "category": "Smileys & Emotion", "subcategory": "face-hand", "sort_order": 50,
              "has_img_twitter": False})
  return out


def drawing(name: str, set_name: str) -> bytes:
  """A 64-px RGBA drawing: a disc whose colour depends on the emoji and the set."""
  rng = np.random.default_rng([sum(map(ord, name)), sum(map(ord, set_name))])
  yy, xx = np.mgrid[:64, :64]
  disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 24 ** 2
  rgba = np.zeros((64, 64, 4), np.uint8)
  rgba[disc] = [*rng.integers(0, 256, 3), 255]
  buffer = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
  return buffer.getvalue()


def write_package(npm_dir, set_name: str) -> None:
  npm_dir.mkdir(parents=True, exist_ok=True)
  name = f"emoji-datasource-{set_name}"
  files = {"package/package.json": json.dumps({"name": name, "version": emoji.NPM_VERSION,
                                               "license": "MIT"}).encode(),
           "package/emoji.json": json.dumps(entries()).encode()}
  for e in entries():
    files[f"package/img/{set_name}/64/{e['image']}"] = drawing(e["image"], set_name)
  # The same bytes every time (gzip's header time fixed), as a published tarball is.
  with gzip.GzipFile(npm_dir / f"{name}-{emoji.NPM_VERSION}.tgz", "wb", mtime=0) as gz, \
       tarfile.open(fileobj=gz, mode="w") as tar:
    for path, data in files.items():
      info = tarfile.TarInfo(path)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


CONFIG = emoji.EmojiConfig(size=16, instances=5, sets=SETS, min_sets=2,
                           ood_categories=("Flags",))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("emoji_data")
  for s in SETS:
    write_package(emoji.npm_dir(data_dir), s)
  return data_dir, emoji.build(data_dir, CONFIG, progress=False)


def test_build_keeps_emoji_every_set_draws_with_instances_cycling_over_sets(built):
  data_dir, path = built
  meta = json.loads((path / "metadata.json").read_text())
  images = np.load(path / "images.npy")
  # The Component swatch and the emoji Twitter does not draw are not classes.
  assert [c["category"] for c in meta["classes"]] == ["Smileys & Emotion"] * 20 + ["Flags"] * 20
  assert "1F9FF" not in {c["unified"] for c in meta["classes"]}
  assert meta["id_categories"] == ["Smileys & Emotion"] and meta["ood_categories"] == ["Flags"]
  assert images.shape == (40 * 5, 16, 16, 3) and images.dtype == np.uint8
  assert all(c["count"] == 5 and c["sets"] == list(SETS) for c in meta["classes"])
  first = images[meta["classes"][0]["first"]:][:5].astype(int)
  # Instances 0, 2, 4 are Google's drawing and 1, 3 Twitter's: the disc colours say which.
  centre = first[:, 8, 8]
  assert np.abs(centre[0] - centre[2]).max() < 40 and np.abs(centre[0] - centre[1]).max() > 40
  assert not np.array_equal(first[0], first[2])  # the same drawing, jittered differently
  assert (first[:, 0, 0] == 255).all()  # on white
  packages = {p["set"]: p for p in meta["packages"]}
  assert packages["twitter"]["licence"] == "MIT" and packages["twitter"]["version"] == "16.0.0"
  assert packages["twitter"]["image_licence"].startswith("CC-BY-4.0")
  assert len(packages["google"]["sha256"]) == 64
  assert emoji.build(data_dir, CONFIG, progress=False) == path  # cached


def test_build_is_deterministic(built, tmp_path):
  _, path = built
  for s in SETS:
    write_package(emoji.npm_dir(tmp_path), s)
  again = emoji.build(tmp_path, CONFIG, progress=False)
  assert (again / "images.npy").read_bytes() == (path / "images.npy").read_bytes()
  assert again.name == path.name
  other = emoji.build(tmp_path, emoji.EmojiConfig(**{**CONFIG.__dict__, "seed": 1}),
                      progress=False)
  assert not np.array_equal(np.load(other / "images.npy"), np.load(path / "images.npy"))


def test_domains_and_specs(built, monkeypatch):
  data_dir, path = built
  monkeypatch.setenv("SMAT_EMOJI_BUILD", str(path))
  domain = spec_lib.load_domain("emoji:id", str(data_dir))
  names = {s: {c.name for c in domain.classes(s)} for s in ("pool", "train", "val", "test")}
  assert [len(names[s]) for s in ("pool", "train", "val", "test")] == [7, 7, 3, 3]
  assert sum(map(len, names.values())) == len(set().union(*names.values()))  # disjoint
  assert {c.group for s in ("pool", "train", "val", "test") for c in domain.classes(s)} == {
      "face-smiling", "face-hand"}
  c = domain.classes("test")[0]
  assert domain.read(int(c.image_ids[0])).shape == (16, 16, 3)
  ood = spec_lib.load_domain("emoji:ood", str(data_dir))
  assert ood.classes("train") == () and len(ood.classes("test")) == 20
  flags = spec_lib.load_domain("emoji:flags", str(data_dir))
  assert [c.name for c in flags.classes("test")] == [c.name for c in ood.classes("test")]
  assert flags.metadata["packages"][0]["name"] == "emoji-datasource-google"
  with pytest.raises(DataError, match=r"emoji:nope: no such category; .*smileys_emotion"):
    spec_lib.load_domain("emoji:nope", str(data_dir))


def test_missing_packages_are_one_error_with_the_fetch_command(tmp_path):
  write_package(emoji.npm_dir(tmp_path), "google")
  with pytest.raises(DataError) as info:
    emoji.build(tmp_path, CONFIG, progress=False)
  assert str(info.value).count("emoji-datasource-twitter") == 2  # missing, and npm pack it
  assert f"npm pack emoji-datasource-twitter@16.0.0 --pack-destination {tmp_path / 'npm'}" in str(
      info.value)
  (emoji.npm_dir(tmp_path) / "emoji-datasource-twitter-16.0.0.tgz").write_bytes(b"truncated")
  with pytest.raises(DataError, match="not a readable npm package tarball"):
    emoji.build(tmp_path, CONFIG, progress=False)
  with pytest.raises(DataError, match="emoji domains not built"):
    emoji.find_build(tmp_path)


def test_cli_prepare_emoji(built, tmp_path, capsys):
  for s in SETS:
    write_package(emoji.npm_dir(tmp_path), s)
  assert cli.main(["data", "prepare", "emoji", "--data-dir", str(tmp_path), "--emoji-sets",
                   "google,twitter", "--size", "16", "--instances", "5"]) == 0
  out = capsys.readouterr().out
  # The default held-out categories: Flags here (the fixture has no Symbols or Food & Drink).
  assert "emoji: 1 ID categories, 1 held-out categories, 40 classes, 200 images" in out
  assert cli.main(["data", "prepare", "emoji", "--data-dir", str(tmp_path), "--emoji-sets",
                   "google,nope"]) == 2
  assert "unknown set(s) ['nope']" in capsys.readouterr().err
