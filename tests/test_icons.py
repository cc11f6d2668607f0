"""The icons source on a fixture: a small @iconify/json tarball (package.json and
json/<prefix>.json per icon set, SVG bodies), built, read back as a domain and through SPECs."""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from smat import cli
from smat.data import spec as spec_lib
from smat.data.sources import icons
from smat.errors import DataError

SETS = ("alpha", "beta", "gamma", "nc", "colour")
# Concept → a filled rectangle (x0, y0, x1, y1), fractions of the icon's box; one per concept.
SHAPES = {"box": (0.25, 0.25, 0.75, 0.75), "circle": (0.1, 0.1, 0.5, 0.5),
          "triangle": (0.5, 0.1, 0.9, 0.5), "star": (0.1, 0.5, 0.5, 0.9),
          "heart": (0.5, 0.5, 0.9, 0.9), "arrow-up": (0.4, 0.05, 0.6, 0.95),
          "arrow-down": (0.05, 0.4, 0.95, 0.6), "arrow-left": (0.2, 0.2, 0.4, 0.8),
          "home": (0.6, 0.2, 0.8, 0.8), "bell": (0.2, 0.6, 0.8, 0.8)}


def body(concept: str, grid: tuple[float, float, float], variant: int = 0) -> str:
  """A rectangle path in a set's coordinates (left, top, side); a variant adds a bar."""
  left, top, side = grid
  x0, y0, x1, y1 = (left + f * side if i % 2 == 0 else top + f * side
                    for i, f in enumerate(SHAPES[concept]))
  path = f'<path fill="currentColor" d="M{x0:g} {y0:g}H{x1:g}V{y1:g}H{x0:g}z"/>'
  if variant:
    path += (f'<rect x="{left:g}" y="{top:g}" width="{side:g}" height="{side / 10:g}" '
             f'fill="currentColor"/>')
  return path


def icon_sets() -> dict[str, dict]:
  """alpha: no declared variants, style suffixes, a hidden bell; beta: declared suffixes, the
  default 16-px box, 'house' with an alias 'home', a rotated icon; gamma: declared prefixes
  (Material's outline-/baseline-) and a shifted view box; nc: not openly licensed; colour: a
  coloured set."""
  a = (0, 0, 24)
  alpha = {"box": body("box", a), "circle": body("circle", a),
           "circle-filled": body("circle", a, 1), "triangle-solid": body("triangle", a, 1),
           "triangle-outline": body("triangle", a), "star": body("star", a),
           "heart": body("heart", a), "arrow-up": body("arrow-up", a),
           "arrow-down": body("arrow-down", a), "arrow-left": body("arrow-left", a),
           "home": body("home", a)}
  alpha = {"icons": {n: {"body": b} for n, b in alpha.items()}, "width": 24, "height": 24}
  alpha["icons"]["bell"] = {"body": body("bell", a), "hidden": True}
  b = (0, 0, 16)
  beta = {"icons": {n: {"body": body(n, b)} for n in SHAPES if n != "home"},
          "aliases": {"home": {"parent": "house"}, "arrow-right": {"parent": "arrow-left",
                                                                   "hFlip": True}},
          "suffixes": {"": "Regular", "fill": "Fill"}}
  beta["icons"]["house"] = {"body": body("home", b)}
  beta["icons"]["box-fill"] = {"body": body("box", b, 1)}
  beta["icons"]["arrow-spin"] = {"body": body("arrow-up", b, 1), "rotate": 1}
  g = (-2, -2, 28)
  gamma = {"icons": {f"outline-{n}": {"body": body(n, g)} for n in SHAPES},
           "left": -2, "top": -2, "width": 28, "height": 28,
           "prefixes": {"outline": "Outline", "baseline": "Baseline"}}
  gamma["icons"]["baseline-box"] = {"body": body("box", g, 1)}
  everything = {"icons": {n: {"body": body(n, a)} for n in SHAPES}, "width": 24, "height": 24}
  licences = {"alpha": "MIT", "beta": "Apache-2.0", "gamma": "CC-BY-4.0", "nc": "CC-BY-NC-4.0",
              "colour": "MIT"}
  out = {}
  for prefix, icon_set in zip(SETS, (alpha, beta, gamma, dict(everything), dict(everything))):
    out[prefix] = {"prefix": prefix, **icon_set,
                   "info": {"name": prefix.title(), "author": {"name": f"{prefix} team"},
                            "license": {"title": licences[prefix], "spdx": licences[prefix]},
                            "palette": prefix == "colour"}}
  return out


def write_package(npm_dir) -> None:
  npm_dir.mkdir(parents=True, exist_ok=True)
  files = {"package/package.json": json.dumps({"name": "@iconify/json",
                                               "version": icons.NPM_VERSION,
                                               "license": "MIT"}).encode()}
  for prefix, icon_set in icon_sets().items():
    files[f"package/json/{prefix}.json"] = json.dumps(icon_set).encode()
  # The same bytes every time (gzip's header time fixed), as a published tarball is.
  with gzip.GzipFile(npm_dir / icons.TARBALL, "wb", mtime=0) as gz, \
       tarfile.open(fileobj=gz, mode="w") as tar:
    for path, data in files.items():
      info = tarfile.TarInfo(path)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


CONFIG = icons.IconsConfig(size=16, instances=5, sets=SETS, min_sets=3)
CLASSES = ["arrow-down", "arrow-left", "arrow-up", "box", "circle", "heart", "home", "star",
           "triangle"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("icons_data")
  write_package(icons.npm_dir(data_dir))
  return data_dir, icons.build(data_dir, CONFIG, progress=False)


def test_concepts_drop_style_and_size_words():
  generic = {}
  assert icons.concept_of("home-outline", generic) == ("home", ("outline",))
  assert icons.concept_of("arrow-down-bold", generic)[0] == "arrow-down"
  assert icons.concept_of("home-01", generic)[0] == "home"  # hugeicons' first numbered drawing
  assert icons.concept_of("battery-50", generic)[0] == "battery-50"  # numbers that mean something
  assert icons.concept_of("line", generic)[0] == "line"  # never down to nothing
  fluent = {"suffixes": {"16-regular": "", "24-regular": "", "24-filled": ""}}
  assert icons.concept_of("home-24-regular", fluent) == ("home", ("regular", "24"))
  # A set that declares its variants loses only those: Phosphor's house-line is another house.
  phosphor = {"suffixes": {"": "Regular", "bold": "Bold", "fill": "Fill"}}
  assert icons.concept_of("house-line", phosphor)[0] == "house-line"
  assert icons.concept_of("house-fill", phosphor)[0] == "house"
  material = {"prefixes": {"outline": "", "baseline": ""}}
  assert icons.concept_of("outline-home", material)[0] == "home"
  # Outline first, then plain, then light, then filled; sizes nearest 24 px first.
  names = ["home-fill", "home", "home-light", "home-outline"]
  ranked = sorted(names, key=lambda n: icons._preference(n, icons.concept_of(n, generic)[1]))
  assert ranked == ["home-outline", "home", "home-light", "home-fill"]
  sized = ["home-16-regular", "home-24-regular"]
  assert min(sized, key=lambda n: icons._preference(n, icons.concept_of(n, fluent)[1])) == sized[1]


def test_build_keeps_concepts_three_open_monochrome_sets_draw(built):
  data_dir, path = built
  meta = json.loads((path / "metadata.json").read_text())
  images = np.load(path / "images.npy")
  classes = {c["concept"]: c for c in meta["classes"]}
  # The bell is hidden in alpha, so two sets draw it; nc and colour do not count.
  assert sorted(classes) == CLASSES
  assert images.shape == (9 * 5, 16, 16) and images.dtype == np.uint8
  assert all(c["count"] == 5 and sorted(c["sets"]) == ["alpha", "beta", "gamma"]
             for c in meta["classes"])
  # One drawing per set: the outline or plain variant; beta's alias merges house into home.
  assert classes["triangle"]["icons"] == {"alpha": "triangle-outline", "beta": "triangle",
                                          "gamma": "outline-triangle"}
  assert classes["circle"]["icons"]["alpha"] == "circle"
  assert classes["box"]["icons"] == {"alpha": "box", "beta": "box", "gamma": "outline-box"}
  assert classes["home"]["icons"]["beta"] == "house"
  assert classes["home"]["names"] == ["home", "house"]
  assert {c["concept"]: c["group"] for c in meta["classes"] if c["group"]} == {
      "arrow-down": "arrow", "arrow-left": "arrow", "arrow-up": "arrow"}
  # Licences and provenance.
  sets = {s["prefix"]: s for s in meta["sets"]}
  assert list(sets) == ["alpha", "beta", "gamma"]
  assert sets["gamma"]["licence"] == {"title": "CC-BY-4.0", "spdx": "CC-BY-4.0"}
  assert sets["beta"]["author"] == {"name": "beta team"} and sets["alpha"]["classes"] == 9
  assert meta["skipped_sets"]["nc"]["reason"] == "licence CC-BY-NC-4.0 is not open"
  assert meta["skipped_sets"]["colour"]["reason"] == "coloured (palette: true)"
  package = meta["packages"][0]
  assert package["name"] == "@iconify/json" and package["version"] == icons.NPM_VERSION
  assert package["licence"] == "MIT" and len(package["sha256"]) == 64
  assert meta["renderer"]["resvg-py"] and meta["num_images"] == 45
  assert icons.build(data_dir, CONFIG, progress=False) == path  # cached


def test_build_is_deterministic(built, tmp_path):
  _, path = built
  write_package(icons.npm_dir(tmp_path))
  again = icons.build(tmp_path, CONFIG, progress=False)
  assert again.name == path.name
  assert (again / "images.npy").read_bytes() == (path / "images.npy").read_bytes()
  assert (again / "metadata.json").read_bytes() == (path / "metadata.json").read_bytes()
  other = icons.build(tmp_path, icons.IconsConfig(**{**CONFIG.__dict__, "seed": 1}),
                      progress=False)
  assert not np.array_equal(np.load(other / "images.npy"), np.load(path / "images.npy"))


def test_domain_splits_by_class_and_draws_black_on_white(built, monkeypatch):
  data_dir, path = built
  monkeypatch.setenv("SMAT_ICONS_BUILD", str(path))
  domain = spec_lib.load_domain("icons:id", str(data_dir))
  names = {s: {c.name for c in domain.classes(s)} for s in ("pool", "train", "val", "test")}
  assert [len(names[s]) for s in ("pool", "train", "val", "test")] == [3, 3, 1, 2]
  assert sum(map(len, names.values())) == len(set().union(*names.values()))  # disjoint
  assert set().union(*names.values()) == {f"icons/{c}" for c in CLASSES}
  assert domain.metadata["sets"] == ["alpha", "beta", "gamma"]
  box = next(c for s in ("pool", "train", "val", "test") for c in domain.classes(s)
             if c.name == "icons/box")
  for image_id in box.image_ids:  # a filled square in the middle, jittered, in every set
    image = domain.read(int(image_id))
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image[7:9, 7:9] < 60).all() and (image[[0, 0, -1, -1], [0, -1, 0, -1]] > 240).all()
  with pytest.raises(DataError, match=r"icons:nope: no such domain; choose icons:id"):
    spec_lib.load_domain("icons:nope", str(data_dir))


def test_missing_package_is_one_error_with_the_fetch_command(tmp_path):
  with pytest.raises(DataError) as info:
    icons.build(tmp_path, CONFIG, progress=False)
  assert (f"fetch it with `npm pack @iconify/json@{icons.NPM_VERSION} --pack-destination "
          f"{tmp_path / 'npm'}`") in str(info.value)
  (tmp_path / "npm").mkdir()
  (tmp_path / "npm" / icons.TARBALL).write_bytes(b"truncated")
  with pytest.raises(DataError, match="not a readable npm package tarball"):
    icons.build(tmp_path, CONFIG, progress=False)
  write_package(icons.npm_dir(tmp_path))
  with pytest.raises(DataError, match=r"unknown icon set\(s\) \['alpah'\].*did you mean alpha"):
    icons.build(tmp_path, icons.IconsConfig(sets=("alpah", "beta")), progress=False)
  with pytest.raises(DataError, match="none of the sets .* is usable"):
    icons.build(tmp_path, icons.IconsConfig(sets=("nc", "colour")), progress=False)
  with pytest.raises(DataError, match="icons domain not built"):
    icons.find_build(tmp_path)


def test_cli_prepare_icons(tmp_path, capsys):
  args = ["data", "prepare", "icons", "--data-dir", str(tmp_path), "--icon-sets", ",".join(SETS),
          "--min-sets", "3", "--size", "16", "--instances", "5"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: icons: npm package @iconify/json")
  assert f"npm pack @iconify/json@{icons.NPM_VERSION} --pack-destination" in err
  write_package(icons.npm_dir(tmp_path))
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "icons: 9 classes (1 groups), 45 images from 3 icon sets in" in out
  assert "skipped nc: licence CC-BY-NC-4.0 is not open" in out
  assert cli.main([*args[:-4], "--min-sets", "0"]) == 2
  assert "--min-sets 0: must be at least 1" in capsys.readouterr().err
