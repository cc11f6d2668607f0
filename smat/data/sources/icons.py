"""The offline *icons* domain: the same icon concept drawn by independent icon sets, from npm.

* class = an icon concept ("home", "arrow-down", "trash"), instance = its drawing in one icon set,
  rasterised in black on white with seeded affine jitter (rotation, scale, aspect, shift), in
  grayscale: line drawings, QuickDraw's role; group = the concept's first word ("arrow",
  "file", "user") when at least two classes share it, for within-group ways.
* The drawings come from the npm package `@iconify/json` (one JSON file per icon set, SVG bodies),
  fetched with `npm pack @iconify/json@<version> --pack-destination <data dir>/npm` and read
  from the tarball without unpacking; resvg (the `resvg-py` wheel) rasterises them.
* Only monochrome sets (`palette` false) under an open licence are used; the others are skipped
  and listed with the reason in the metadata. The default sets are 30 of the package's UI icon
  sets with distinct drawing styles (no two are one family's variants, e.g. Font Awesome 6 only).
* A concept is an icon name with its style and size variants taken off (`concept_of`): the
  set's own declared suffixes/prefixes (`home-24-regular`, `outline-home`), else a fixed list
  (`-outline`, `-filled`, `-solid`, `-bold`, `-line`, `-01`...). Names that a set's plain
  aliases declare equivalent (`home` → `house`) are one concept (`synonyms`: at most
  `max_synonyms` names, and never two names most sets draw as different icons, as alias chains
  join unlike things: close → cancel → ban). Per set and concept one drawing is kept, the
  outline variant first, then the plain one, then the others (`_preference`); hidden icons and
  rotated or flipped ones are skipped.
* A concept drawn by at least `min_sets` sets is a class; every class gets exactly `instances`
  images, cycling over its sets in a seeded order (a random subset when it has more sets than
  instances). There is one domain, `icons:id`, its classes split train/val/test.

The build is a pure function of (package tarball, `IconsConfig`, resvg/Pillow/numpy versions):
same package + seed → byte-identical files. The package's name, version, sha256 and licence,
and each set's name, author and licence, are recorded in the metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from smat.data import domain
from smat.data.domain import (Domain, ImageClass, split_classes_by_fraction,
                               write_build)
from smat.data.sources.emoji import jitter_affine, npm_dir
from smat.errors import DataError, require

FORMAT_VERSION = 1
NPM_PACKAGE = "@iconify/json"
NPM_VERSION = "2.2.535"
TARBALL = f"iconify-json-{NPM_VERSION}.tgz"  # npm pack's file name for the scoped package

# Monochrome UI icon sets of @iconify/json 2.2.535 with distinct drawing styles, by prefix;
# the licence each declares (package/json/<prefix>.json, info.license.spdx) in the comment.
DEFAULT_SETS = (
    "mdi",  # Material Design Icons, Apache-2.0
    "material-symbols",  # Google Material Symbols, Apache-2.0
    "tabler",  # MIT
    "lucide",  # ISC
    "ph",  # Phosphor, MIT
    "carbon",  # IBM Carbon, Apache-2.0
    "fluent",  # Microsoft Fluent UI System Icons, MIT
    "heroicons",  # MIT
    "bi",  # Bootstrap Icons, MIT
    "ri",  # Remix Icon, Apache-2.0
    "iconoir",  # MIT
    "mingcute",  # Apache-2.0
    "solar",  # CC-BY-4.0
    "akar-icons",  # MIT
    "ion",  # IonIcons, MIT
    "octicon",  # GitHub Octicons, MIT
    "fa6-solid",  # Font Awesome 6 Solid, CC-BY-4.0
    "majesticons",  # MIT
    "uil",  # Unicons, Apache-2.0
    "ant-design",  # MIT
    "hugeicons",  # MIT
    "icon-park-outline",  # Apache-2.0
    "la",  # Line Awesome, Apache-2.0
    "clarity",  # MIT
    "eva",  # MIT
    "jam",  # MIT
    "boxicons",  # MIT
    "mynaui",  # MIT
    "pixelarticons",  # MIT
    "streamline-freehand",  # Streamline Freehand (hand-drawn), CC-BY-4.0
)
# Open licences (SPDX ids): permissive, attribution and share-alike ones. Not open: the
# non-commercial ones (CC-BY-NC-*) and sets that name no licence.
OPEN_LICENCES = frozenset({
    "MIT", "ISC", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "0BSD", "Unlicense", "CC0-1.0",
    "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "OFL-1.1", "MPL-2.0",
    "GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0", "GPL-3.0-only", "GPL-3.0-or-later",
})

# Style words that name a variant of a drawing, not a concept, with how much a line-drawing
# benchmark wants that variant: outlines first (-1), then the plain name (0), then light or
# rounded strokes (1), then filled or two-tone ones (2). Used when a set declares no suffixes.
_STYLE_PREFERENCE = {
    **dict.fromkeys(("outline", "outlined", "line", "linear", "regular", "stroke"), -1),
    **dict.fromkeys(("rounded", "round", "sharp", "light", "thin", "broken"), 1),
    **dict.fromkeys(("filled", "fill", "solid", "bold", "duotone", "twotone", "baseline"), 2),
}
# "-01": the first of a set's numbered drawings of a concept (hugeicons' home-01 ... home-13).
_GENERIC_SUFFIXES = frozenset(_STYLE_PREFERENCE) | {"01"}
_TRANSFORMS = ("rotate", "hFlip", "vFlip")
_BLANK_INK = 1e-3  # a drawing whose mean ink (0..1) is below this rendered as nothing


@dataclasses.dataclass(frozen=True)
class IconsConfig:
  """Everything the build depends on besides the package tarball."""

  size: int = 32  # stored image side, pixels
  instances: int = 20  # images per class
  sets: tuple[str, ...] = DEFAULT_SETS
  min_sets: int = 6  # icon sets that must draw a concept
  max_synonyms: int = 4  # alias-linked names merged into one concept, at most
  max_overlap: float = 0.5  # `synonyms`: sets telling two names apart, at most this fraction
  # At most this many classes: the concepts drawn by the most sets (ties by name).
  max_classes: int | None = None
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  seed: int = 0
  # Jitter (emoji's `jitter_affine` reads these fields), applied per instance to the drawing
  # rasterised at `render_scale` × size, before downsampling.
  render_scale: int = 4
  max_rotation_deg: float = 12.0
  scale_range: tuple[float, float] = (0.75, 1.0)  # drawing box as a fraction of the image
  max_aspect_change: float = 0.1
  max_shift: float = 0.08  # fraction of the image side

  def cache_key(self, packages: Sequence[dict]) -> str:
    text = json.dumps([FORMAT_VERSION, dataclasses.asdict(self), list(packages)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# The package.


def fetch_command(data_dir: str | os.PathLike) -> str:
  return f"npm pack {NPM_PACKAGE}@{NPM_VERSION} --pack-destination {npm_dir(data_dir)}"


def find_tarball(data_dir: str | os.PathLike) -> Path:
  """The package tarball in <data dir>/npm, or one error naming the command that fetches it."""
  path = npm_dir(data_dir) / TARBALL
  if not path.is_file():
    raise DataError(f"icons: npm package {NPM_PACKAGE}@{NPM_VERSION} not in {npm_dir(data_dir)}; "
                    f"fetch it with `{fetch_command(data_dir)}` (bash bootstrap.sh does)")
  return path


def read_package(path: Path, prefixes: Iterable[str]) -> tuple[dict, dict[str, dict], list[str]]:
  """(package.json, {prefix: its icon set JSON} for `prefixes` found, every prefix shipped)."""
  wanted = set(prefixes)
  package, icon_sets, shipped = None, {}, []
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:
        if not member.isfile():
          continue
        if member.name == "package/package.json":
          package = json.load(tar.extractfile(member))
        elif member.name.startswith("package/json/") and member.name.endswith(".json"):
          prefix = member.name[len("package/json/"):-len(".json")]
          shipped.append(prefix)
          if prefix in wanted:
            icon_sets[prefix] = json.load(tar.extractfile(member))
  except (OSError, tarfile.TarError, ValueError) as e:
    raise DataError(f"{path}: not a readable npm package tarball ({e}); fetch it again") from None
  if package is None or not shipped:
    raise DataError(f"{path}: no package.json or json/<prefix>.json inside; is it {NPM_PACKAGE}?")
  return package, icon_sets, sorted(shipped)


def describe_package(path: Path, package: dict) -> dict:
  return {"name": package.get("name"), "version": package.get("version"),
          "licence": package.get("license"), "file": path.name,
          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def describe_set(prefix: str, icon_set: dict) -> dict:
  info = icon_set.get("info", {})
  return {"prefix": prefix, "name": info.get("name"), "version": info.get("version"),
          "author": info.get("author"), "licence": info.get("license"),
          "palette": info.get("palette"), "category": info.get("category")}


def skip_reason(icon_set: dict) -> str | None:
  """Why a set is not used (coloured, or not openly licensed), or None."""
  info = icon_set.get("info", {})
  if info.get("palette"):
    return "coloured (palette: true)"
  licence = info.get("license") or {}
  if licence.get("spdx") not in OPEN_LICENCES:
    return f"licence {licence.get('spdx') or licence.get('title') or 'unknown'} is not open"
  return None


# --------------------------------------------------------------------------------------------
# Concepts.


def concept_of(name: str, icon_set: dict) -> tuple[str, tuple[str, ...]]:
  """(concept, style/size words taken off) of an icon name.

  A set that declares its variants (`suffixes`, `prefixes`: fluent's `24-regular`, ic's
  `outline-`) loses exactly those words; another loses the generic style words. Words come
  off the ends while at least one is left: 'home-24-regular' → ('home', ('regular', '24')).
  """
  words = name.lower().split("-")
  declared_prefixes = {w for p in icon_set.get("prefixes") or {} for w in p.split("-") if w}
  declared = icon_set.get("suffixes")
  suffixes = ({w for s in declared for w in s.split("-") if w} if declared is not None
              else _GENERIC_SUFFIXES)
  taken = []
  while len(words) > 1 and words[0] in declared_prefixes:
    taken.append(words.pop(0))
  while len(words) > 1 and words[-1] in suffixes:
    taken.append(words.pop())
  return "-".join(words), tuple(taken)


def _preference(name: str, taken: Sequence[str]) -> tuple:
  """Sort key among one set's drawings of a concept: outline, plain, light, filled; then the
  size nearest 24 px (fluent, octicon, heroicons draw several); then the name."""
  style = sum(_STYLE_PREFERENCE.get(w, 0) for w in taken)
  size = min((abs(int(w) - 24) for w in taken if w.isdigit() and w != "01"), default=0)
  return (style, size, name)


def _drawable(icon: dict) -> bool:
  return not icon.get("hidden") and "body" in icon and not any(icon.get(t) for t in _TRANSFORMS)


def _root(icon_set: dict, name: str) -> str | None:
  """The icon a plain alias (no rotation or flip) names, following alias chains."""
  aliases = icon_set.get("aliases") or {}
  seen = set()
  while name in aliases and name not in seen:
    seen.add(name)
    alias = aliases[name]
    if alias.get("hidden") or set(alias) - {"parent"}:
      return None
    name = alias.get("parent")
  icon = (icon_set.get("icons") or {}).get(name)
  return name if icon is not None and _drawable(icon) else None


def synonyms(icon_sets: dict[str, dict], max_synonyms: int = 4,
             max_overlap: float = 0.5) -> dict[str, str]:
  """{concept: the concept it is merged into}, for the concepts merged with others.

  Each set's plain aliases link the concept of the alias to that of its icon ('home' →
  'house'), unless the set also draws the alias's concept as an icon of its own. Links are
  merged greedily, those declared by more sets first, then those between more widely drawn
  names (then by name), skipping a merge that would

  * put more than `max_synonyms` names in one concept (aliases chain unlike things together:
    close → cancel → ban), or
  * join two names that more than `max_overlap` of the sets drawing the rarer one draw as two
    different icons: those sets tell them apart (ban and cancel are, home and house are not).

  A merged concept is named after its name drawn by the most sets (ties: shorter, then
  alphabetical)."""
  drawn_in: dict[str, set[str]] = {}  # concept → the sets that draw it under that name
  support: dict[tuple[str, str], int] = {}
  for prefix in sorted(icon_sets):
    icon_set = icon_sets[prefix]
    own = {concept_of(n, icon_set)[0] for n, icon in icon_set.get("icons", {}).items()
           if _drawable(icon)}
    for concept in own:
      drawn_in.setdefault(concept, set()).add(prefix)
    links = set()
    for alias in icon_set.get("aliases") or {}:
      root = _root(icon_set, alias)
      if root is None:
        continue
      a, b = concept_of(alias, icon_set)[0], concept_of(root, icon_set)[0]
      # An alias whose concept the set also draws as an icon of its own links two things the
      # set tells apart (mdi: help → its question mark, help-outline → handshake-outline).
      if a != b and a not in own:
        links.add((min(a, b), max(a, b)))
    for link in links:
      support[link] = support.get(link, 0) + 1

  def drawn(name: str) -> int:
    return len(drawn_in.get(name, ()))

  def told_apart(x: str, y: str) -> bool:
    both = len(drawn_in.get(x, set()) & drawn_in.get(y, set()))
    return both > max_overlap * max(1, min(drawn(x), drawn(y)))

  members: dict[str, list[str]] = {}  # component id (its first name) → its names
  component: dict[str, str] = {}
  for a, b in sorted(support, key=lambda l: (-support[l], -min(map(drawn, l)), l)):
    ca, cb = component.get(a, a), component.get(b, b)
    names_a, names_b = members.get(ca, [a]), members.get(cb, [b])
    if (ca == cb or len(names_a) + len(names_b) > max_synonyms
        or any(told_apart(x, y) for x in names_a for y in names_b)):
      continue
    names = sorted(names_a + names_b)
    members.pop(ca, None)
    members.pop(cb, None)
    members[names[0]] = names
    component.update(dict.fromkeys(names, names[0]))
  merged = {}
  for names in members.values():
    canonical = min(names, key=lambda n: (-drawn(n), len(n), n))
    merged.update(dict.fromkeys(names, canonical))
  return merged


def drawings_by_concept(icon_sets: dict[str, dict], merged: dict[str, str]
                        ) -> dict[str, dict[str, str]]:
  """{concept: {prefix: the icon name drawing it in that set}}: one drawing per set and concept
  (among merged synonyms the concept's own name, then the name most sets draw; then
  `_preference`), and one concept per drawing (identical bodies in one set count once, for the
  concept drawn by most sets)."""
  drawn: dict[str, int] = {}  # sets drawing each name
  for icon_set in icon_sets.values():
    for own in {concept_of(n, icon_set)[0] for n, i in icon_set.get("icons", {}).items()
                if _drawable(i)}:
      drawn[own] = drawn.get(own, 0) + 1
  chosen: dict[str, dict[str, tuple]] = {}
  for prefix, icon_set in icon_sets.items():
    for name, icon in icon_set.get("icons", {}).items():
      if not _drawable(icon):
        continue
      own, taken = concept_of(name, icon_set)
      concept = merged.get(own, own)
      # The merged concept's most widely drawn name first, then the drawing's style.
      key = (own != concept, -drawn[own], own, *_preference(name, taken))
      best = chosen.setdefault(concept, {}).get(prefix)
      if best is None or key < best:
        chosen[concept][prefix] = key
  by_concept = {c: {p: key[-1] for p, key in per_set.items()} for c, per_set in chosen.items()}
  # A body drawn under two concepts in one set (duplicates, renamed icons): the concept drawn
  # by more sets (ties: alphabetical) keeps it.
  order = sorted(by_concept, key=lambda c: (-len(by_concept[c]), c))
  used: set[tuple[str, str]] = set()
  for concept in order:
    for prefix in sorted(by_concept[concept]):
      icon = icon_sets[prefix]["icons"][by_concept[concept][prefix]]
      body = (prefix, json.dumps(_geometry(icon_sets[prefix], icon), sort_keys=True))
      if body in used:
        del by_concept[concept][prefix]
      used.add(body)
  return by_concept


# --------------------------------------------------------------------------------------------
# Rendering.


def _geometry(icon_set: dict, icon: dict) -> dict:
  """An icon's body and view box, with the set's defaults (Iconify's: 16 × 16 at 0, 0)."""
  get = lambda key, default: icon.get(key, icon_set.get(key, default))  # noqa: E731
  return {"body": icon["body"], "left": get("left", 0), "top": get("top", 0),
          "width": get("width", 16), "height": get("height", 16)}


def svg_document(icon_set: dict, name: str, side: int) -> str:
  """The icon as a standalone SVG, `side` px square (a non-square view box is centred), in
  black (`currentColor`)."""
  g = _geometry(icon_set, icon_set["icons"][name])
  return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
          f'viewBox="{g["left"]} {g["top"]} {g["width"]} {g["height"]}" width="{side}" '
          f'height="{side}" color="#000000">{g["body"]}</svg>')


def rasterise(svg: str) -> np.ndarray:
  """SVG → ink uint8 [side, side] (0 = paper, 255 = ink), drawn on white by resvg."""
  resvg = require("resvg_py", "icons", "the icons source").svg_to_bytes
  try:
    png = resvg(svg_string=svg, background="#ffffff", skip_system_fonts=True)
  except ValueError:  # a body resvg cannot parse: no drawing
    return np.zeros((1, 1), np.uint8)
  gray = np.asarray(Image.open(io.BytesIO(bytes(png))).convert("L"), np.uint8)
  return 255 - gray


def render_instance(ink: np.ndarray, seed_words: Sequence[int], config: IconsConfig
                    ) -> np.ndarray:
  """One jittered drawing (ink from `rasterise`, render_scale × size) → uint8 [size, size] ink."""
  rng = np.random.default_rng(list(seed_words))
  side = ink.shape[0]
  moved = Image.fromarray(ink, "L").transform(
      (side, side), Image.Transform.AFFINE, jitter_affine(rng, side, config),
      resample=Image.Resampling.BICUBIC, fillcolor=0)
  return np.asarray(moved.resize((config.size, config.size), Image.Resampling.BOX), np.uint8)


def renderer_versions() -> dict[str, str]:
  """Libraries that draw the icons (resvg rasterises, Pillow jitters and downsamples, numpy
  draws the jitter): another version may change the bytes, which `images_sha256` then shows."""
  import importlib.metadata as metadata_lib

  return {name: metadata_lib.version(name) for name in ("resvg-py", "pillow", "numpy")}


# --------------------------------------------------------------------------------------------
# Build and load.


def _build_dir(data_dir: str | os.PathLike, config: IconsConfig, packages) -> Path:
  return Path(data_dir) / "icons" / f"s{config.size}-{config.cache_key(packages)}"


def _usable_sets(config: IconsConfig, icon_sets: dict[str, dict], shipped: Sequence[str]
                 ) -> tuple[dict[str, dict], dict[str, str]]:
  unknown = [s for s in config.sets if s not in icon_sets]
  if unknown:
    close = sorted({m for s in unknown for m in difflib.get_close_matches(s, shipped, n=3)})
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise DataError(f"icons: unknown icon set(s) {unknown}: not among the {len(shipped)} sets of "
                    f"{NPM_PACKAGE} {NPM_VERSION}{hint}")
  skipped = {s: r for s in config.sets if (r := skip_reason(icon_sets[s]))}
  usable = {s: icon_sets[s] for s in config.sets if s not in skipped}
  if not usable:
    raise DataError(f"icons: none of the sets {list(config.sets)} is usable: {skipped}")
  return usable, skipped


def build(data_dir: str | os.PathLike, config: IconsConfig = IconsConfig(),
          progress: bool = True) -> Path:
  """Render the icons domain into `data_dir/icons/<key>/` unless it is already there.

  Files: `images.npy` uint8 [N, size, size] ink (0 = paper, 255 = ink; the reader turns it into
  black on white RGB) and `metadata.json` (classes, sets and licences, package, config, sha256
  of the images), written last and atomically: its presence means the build is complete.
  """
  from tqdm import tqdm

  tarball = find_tarball(data_dir)
  package, icon_sets, shipped = read_package(tarball, config.sets)
  packages = [describe_package(tarball, package)]
  usable, skipped = _usable_sets(config, icon_sets, shipped)
  out = _build_dir(data_dir, config, packages)
  if (out / "metadata.json").exists():
    return out
  merged = synonyms(usable, config.max_synonyms, config.max_overlap)
  drawings = drawings_by_concept(usable, merged)
  candidates = sorted((c for c, d in drawings.items() if len(d) >= config.min_sets),
                      key=lambda c: (-len(drawings[c]), c))
  side = config.render_scale * config.size
  names_of: dict[str, list[str]] = {}
  for own, concept in merged.items():
    names_of.setdefault(concept, []).append(own)
  kept: list[tuple[str, dict[str, str], np.ndarray]] = []
  limit = config.max_classes or len(candidates)
  with tqdm(total=min(limit, len(candidates)), desc="render icons", unit="class",
            disable=not progress) as bar:
    for concept in candidates:
      if len(kept) >= limit:
        break
      inks = {p: rasterise(svg_document(usable[p], n, side)) for p, n in drawings[concept].items()}
      inks = {p: ink for p, ink in inks.items()
              if ink.shape == (side, side) and ink.mean() / 255 >= _BLANK_INK}
      if len(inks) < config.min_sets:
        continue
      key = zlib.crc32(concept.encode())
      prefixes = sorted(inks)  # which sets, in which order: seeded, per class
      permutation = np.random.default_rng([config.seed, key]).permutation(len(prefixes))
      order = [prefixes[i] for i in permutation[:config.instances]]
      images = np.stack([
          render_instance(inks[order[i % len(order)]], (config.seed, key, i), config)
          for i in range(config.instances)])
      kept.append((concept, {p: drawings[concept][p] for p in order}, images))
      bar.update()
  if not kept:
    raise DataError(f"icons: no concept is drawn by {config.min_sets} of the sets {list(usable)}")
  kept.sort(key=lambda k: k[0])
  first_words: dict[str, int] = {}
  for concept, _, _ in kept:
    first_words[concept.split("-")[0]] = first_words.get(concept.split("-")[0], 0) + 1
  classes, offset = [], 0
  for concept, used, images in kept:
    word = concept.split("-")[0]
    classes.append({"concept": concept, "group": word if first_words[word] >= 2 else "",
                    "names": sorted(names_of.get(concept, [concept])), "sets": list(used),
                    "icons": used, "first": offset, "count": len(images)})
    offset += len(images)
  images = np.concatenate([k[2] for k in kept])
  drawn = {p: sum(p in c["sets"] for c in classes) for p in usable}
  metadata = {
      "format_version": FORMAT_VERSION,
      "config": dataclasses.asdict(config),
      "packages": packages,
      "sets": [{**describe_set(p, usable[p]), "classes": drawn[p]} for p in usable],
      "skipped_sets": {p: {"reason": r, **describe_set(p, icon_sets[p])}
                       for p, r in skipped.items()},
      "renderer": renderer_versions(),
      "classes": classes,
      "num_images": int(images.shape[0]),
      "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
  }
  write_build(out, images, metadata)
  return out


def find_build(data_dir: str | os.PathLike) -> Path:
  """The build that `icons:` specs read: $SMAT_ICONS_BUILD, else the only finished build."""
  return domain.find_build(data_dir, "icons", "icons domain")


def load_domains(build_dir: str | os.PathLike, which: str) -> Domain:
  """`which` = 'id': every icon class, split train/val/test by class."""
  if which != "id":
    raise DataError(f"icons:{which}: no such domain; choose icons:id")
  build_dir = Path(build_dir)
  meta = json.loads((build_dir / "metadata.json").read_text())
  config = meta["config"]
  classes = [ImageClass(name=f"icons/{c['concept']}", group=c["group"],
                        image_ids=np.arange(c["first"], c["first"] + c["count"], dtype=np.int64))
             for c in meta["classes"]]
  splits = split_classes_by_fraction(classes, tuple(config["split_fractions"]),
                                     seed=[config["seed"], zlib.crc32(b"icons")])
  return Domain(
      name=f"icons:{which}",
      splits=splits,
      read=domain.BuildReader(str(build_dir / "images.npy"), ink=True),
      metadata={"source": "icons", "build": build_dir.name, "packages": meta["packages"],
                "sets": [s["prefix"] for s in meta["sets"]], "renderer": meta.get("renderer"),
                "images_sha256": meta["images_sha256"], "image_size": config["size"]},
  )
