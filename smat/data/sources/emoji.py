"""The offline *emoji* domains: the same emoji drawn by independent design teams, from npm packages.

* class = one emoji (its Unicode sequence), instance = its drawing by one design team with seeded
  affine jitter (rotation, scale, aspect, shift) over a white background, in colour;
  domain = an emoji category (Smileys & Emotion, Flags, ...), group = its subcategory (for
  within-group ways); skin-tone variations are not classes.
* The drawings come from the npm packages `emoji-datasource-<set>` (64-px PNGs and `emoji.json`,
  which names each emoji's category and subcategory), as tarballs fetched with
  `npm pack emoji-datasource-<set>@<version> --pack-destination <data dir>/npm`; they are read
  from the tarballs without unpacking. An emoji is kept when at least `min_sets` sets draw it;
  every class gets exactly `instances` images, cycling over its sets.
* In-distribution categories split their emoji into train/val/test classes; held-out categories
  are used only for OOD evaluation.

The build is a pure function of (package tarballs, `EmojiConfig`, Pillow/numpy versions): same
packages + seed → byte-identical files. Each package's name, version, sha256 and licence, and
each set's image licence, are recorded in the metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from smat.data import domain
from smat.data.domain import Domain, ImageClass, split_classes_by_fraction, write_build
from smat.errors import DataError

FORMAT_VERSION = 1
NPM_VERSION = "16.0.0"
# Design team → (npm package, licence of its images, as the package README states it).
SETS = {
    "apple": ("emoji-datasource-apple", "© Apple Inc.; not licensed for commercial use"),
    "google": ("emoji-datasource-google", "Apache-2.0 (Noto Emoji)"),
    "twitter": ("emoji-datasource-twitter", "CC-BY-4.0 (Twemoji)"),
    "facebook": ("emoji-datasource-facebook", "© Facebook, Inc.; no clear licence"),
}
CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
              "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
# Held out for OOD evaluation, one of each kind of distance from the ID categories: Flags (flat
# coloured rectangles, unlike anything in ID), Symbols (geometric signs and glyph-like marks),
# Food & Drink (organic objects in the ID categories' drawing style, a new subject).
DEFAULT_OOD_CATEGORIES = ("Flags", "Symbols", "Food & Drink")


@dataclasses.dataclass(frozen=True)
class EmojiConfig:
  """Everything the build depends on besides the package tarballs."""

  size: int = 32  # stored image side, pixels
  instances: int = 20  # images per class
  sets: tuple[str, ...] = tuple(SETS)
  min_sets: int = 4  # design teams that must draw an emoji
  min_classes: int = 20  # categories with fewer emoji are dropped
  ood_categories: tuple[str, ...] = DEFAULT_OOD_CATEGORIES
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  seed: int = 0
  # Jitter, applied per instance to the 64-px drawing at 2× before downsampling.
  max_rotation_deg: float = 12.0
  scale_range: tuple[float, float] = (0.7, 0.95)  # drawing side as a fraction of the image
  max_aspect_change: float = 0.1
  max_shift: float = 0.08  # fraction of the image side
  # Restrict the build (tests, quick looks): at most this many emoji per category.
  max_classes_per_category: int | None = None

  def cache_key(self, packages: Sequence[dict]) -> str:
    text = json.dumps([FORMAT_VERSION, dataclasses.asdict(self), list(packages)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(category: str) -> str:
  """'Smileys & Emotion' → 'smileys_emotion' (the SPEC form)."""
  return re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")


def npm_dir(data_dir: str | os.PathLike) -> Path:
  return Path(data_dir) / "npm"


def fetch_command(sets: Sequence[str], data_dir: str | os.PathLike) -> str:
  packages = " ".join(f"{SETS[s][0]}@{NPM_VERSION}" for s in sets)
  return f"npm pack {packages} --pack-destination {npm_dir(data_dir)}"


def find_tarballs(data_dir: str | os.PathLike, sets: Sequence[str]) -> dict[str, Path]:
  """{set: its package tarball in <data dir>/npm}; one error naming every missing one."""
  unknown = [s for s in sets if s not in SETS]
  if unknown:
    raise DataError(f"emoji: unknown set(s) {unknown}; choose from {list(SETS)}")
  found = {s: npm_dir(data_dir) / f"{SETS[s][0]}-{NPM_VERSION}.tgz" for s in sets}
  missing = [s for s, p in found.items() if not p.is_file()]
  if missing:
    raise DataError(f"emoji: npm package(s) {', '.join(SETS[s][0] for s in missing)} not in "
                    f"{npm_dir(data_dir)}; fetch them with `{fetch_command(missing, data_dir)}` "
                    f"(bash bootstrap.sh does)")
  return found


def read_package(path: Path, set_name: str) -> tuple[dict, list[dict], dict[str, bytes]]:
  """(package.json, emoji.json entries, {image file name: 64-px PNG bytes}) of one tarball."""
  prefix = f"package/img/{set_name}/64/"
  package, entries, pngs = None, None, {}
  try:
    with tarfile.open(path, "r:gz") as tar:
      for member in tar:
        if not member.isfile():
          continue
        if member.name == "package/package.json":
          package = json.load(tar.extractfile(member))
        elif member.name == "package/emoji.json":
          entries = json.load(tar.extractfile(member))
        elif member.name.startswith(prefix) and member.name.endswith(".png"):
          pngs[member.name[len(prefix):]] = tar.extractfile(member).read()
  except (OSError, tarfile.TarError, ValueError) as e:
    raise DataError(f"{path}: not a readable npm package tarball ({e}); fetch it again") from None
  if package is None or entries is None or not pngs:
    raise DataError(f"{path}: no package.json, emoji.json or img/{set_name}/64/*.png inside; "
                    f"is it {SETS[set_name][0]}?")
  return package, entries, pngs


def describe_package(path: Path, package: dict, set_name: str) -> dict:
  return {"set": set_name, "name": package.get("name"), "version": package.get("version"),
          "licence": package.get("license"), "image_licence": SETS[set_name][1],
          "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def jitter_affine(rng: np.random.Generator, side: int, config: EmojiConfig) -> tuple[float, ...]:
  """PIL affine coefficients (output → input pixel) placing a `side`² drawing, rotated, scaled
  and shifted, in a `side`² image."""
  angle = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
  scale = rng.uniform(*config.scale_range)
  aspect = 1 + rng.uniform(-config.max_aspect_change, config.max_aspect_change)
  sx, sy = scale * aspect, scale / aspect
  shift = rng.uniform(-config.max_shift, config.max_shift, size=2) * side
  cos, sin = np.cos(angle), np.sin(angle)
  forward = np.array([[sx * cos, -sy * sin], [sx * sin, sy * cos]])
  inverse = np.linalg.inv(forward)
  centre = side / 2
  offset = np.array([centre, centre]) - inverse @ (np.array([centre, centre]) + shift)
  return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def decode(png: bytes) -> Image.Image:
  """A 64-px drawing → RGBA at 2× (jitter is resampled at that resolution)."""
  drawing = Image.open(io.BytesIO(png)).convert("RGBA")
  side = 2 * max(drawing.size)
  return drawing.resize((side, side), Image.BICUBIC)


def render_instance(drawing: Image.Image, seed_words: Sequence[int], config: EmojiConfig
                    ) -> np.ndarray:
  """One jittered drawing (from `decode`) → uint8 RGB [size, size, 3] on white."""
  rng = np.random.default_rng(list(seed_words))
  side = drawing.size[0]
  moved = drawing.transform((side, side), Image.AFFINE, jitter_affine(rng, side, config),
                            resample=Image.BICUBIC, fillcolor=(255, 255, 255, 0))
  canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
  canvas.alpha_composite(moved)
  small = canvas.convert("RGB").resize((config.size, config.size), Image.LANCZOS)
  return np.asarray(small, np.uint8)


def emoji_classes(entries: list[dict], drawn: dict[str, set[str]], config: EmojiConfig
                  ) -> dict[str, list[dict]]:
  """{category: [emoji entries kept]} in emoji.json's sort order: drawn by ≥ min_sets sets."""
  by_category: dict[str, list[dict]] = {}
  for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
    if entry.get("category") not in CATEGORIES:
      continue  # "Component": skin-tone and hair swatches, not emoji
    # A set's own drawing only: has_img_<set> false means the file, if any, is a fallback.
    sets = [s for s in config.sets if entry.get(f"has_img_{s}", True) and entry["image"] in drawn[s]]
    if len(sets) >= config.min_sets:
      by_category.setdefault(entry["category"], []).append({**entry, "sets": sets})
  if config.max_classes_per_category:
    by_category = {k: v[:config.max_classes_per_category] for k, v in by_category.items()}
  return {k: by_category[k] for k in CATEGORIES
          if len(by_category.get(k, ())) >= config.min_classes}


def _build_dir(data_dir: str | os.PathLike, config: EmojiConfig, packages) -> Path:
  return Path(data_dir) / "emoji" / f"s{config.size}-{config.cache_key(packages)}"


def build(data_dir: str | os.PathLike, config: EmojiConfig = EmojiConfig(),
          progress: bool = True) -> Path:
  """Render the emoji domains into `data_dir/emoji/<key>/` unless they are already there.

  Files: `images.npy` uint8 [N, size, size, 3] and `metadata.json` (classes, categories,
  packages, config, sha256 of the images), written last and atomically: its presence means the
  build is complete.
  """
  from tqdm import tqdm

  tarballs = find_tarballs(data_dir, config.sets)
  read = {s: read_package(p, s) for s, p in tarballs.items()}
  packages = [describe_package(tarballs[s], read[s][0], s) for s in config.sets]
  out = _build_dir(data_dir, config, packages)
  if (out / "metadata.json").exists():
    return out
  entries = read[config.sets[0]][1]
  drawn = {s: set(read[s][2]) for s in config.sets}
  categories = emoji_classes(entries, drawn, config)
  if not categories:
    raise DataError(f"emoji: no category has {config.min_classes} emoji drawn by "
                    f"{config.min_sets} of the sets {list(config.sets)}")
  classes, arrays, offset = [], [], 0
  total = sum(len(v) for v in categories.values())
  with tqdm(total=total, desc="render emoji", unit="emoji", disable=not progress) as bar:
    for category, kept in categories.items():
      for entry in kept:
        key = zlib.crc32(entry["unified"].encode())
        drawings = [decode(read[s][2][entry["image"]]) for s in entry["sets"]]
        images = [render_instance(drawings[i % len(drawings)], (config.seed, key, i), config)
                  for i in range(config.instances)]
        classes.append({"category": category, "subcategory": entry.get("subcategory", ""),
                        "unified": entry["unified"], "name": entry.get("short_name", ""),
                        "sets": entry["sets"], "first": offset, "count": len(images)})
        arrays.append(np.stack(images))
        offset += len(images)
        bar.update()
  images = np.concatenate(arrays)
  ood = [c for c in categories if c in config.ood_categories]
  import importlib.metadata as metadata_lib

  metadata = {
      "format_version": FORMAT_VERSION,
      "config": dataclasses.asdict(config),
      "packages": packages,
      "renderer": {name: metadata_lib.version(name) for name in ("pillow", "numpy")},
      "id_categories": [c for c in categories if c not in ood],
      "ood_categories": ood,
      "classes": classes,
      "num_images": int(images.shape[0]),
      "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
  }
  write_build(out, images, metadata)
  return out


def find_build(data_dir: str | os.PathLike) -> Path:
  """The build that `emoji:` specs read: $SMAT_EMOJI_BUILD, else the only finished build."""
  return domain.find_build(data_dir, "emoji", "emoji domains")


def load_domains(build_dir: str | os.PathLike, which: str) -> Domain:
  """`which` = 'id' (all ID categories), 'ood' (all held-out ones) or one category's slug."""
  build_dir = Path(build_dir)
  meta = json.loads((build_dir / "metadata.json").read_text())
  config = meta["config"]
  by_category: dict[str, list[ImageClass]] = {}
  for c in meta["classes"]:
    ids = np.arange(c["first"], c["first"] + c["count"], dtype=np.int64)
    by_category.setdefault(c["category"], []).append(
        ImageClass(name=f"{slug(c['category'])}/{c['unified']}", image_ids=ids,
                   group=c["subcategory"]))
  chosen = {"id": meta["id_categories"], "ood": meta["ood_categories"]}.get(which)
  if chosen is None:
    named = {slug(c): c for c in by_category}
    if which not in named:
      raise DataError(f"emoji:{which}: no such category; choose id, ood or one of {list(named)}")
    chosen = [named[which]]
  splits: dict[str, list[ImageClass]] = {"pool": [], "train": [], "val": [], "test": []}
  for category in chosen:
    if category in meta["ood_categories"]:
      splits["test"].extend(by_category[category])
      continue
    parts = split_classes_by_fraction(by_category[category], tuple(config["split_fractions"]),
                                      seed=[config["seed"], zlib.crc32(category.encode())])
    for split, classes in parts.items():
      splits[split].extend(classes)
  return Domain(
      name=f"emoji:{which}",
      splits={k: tuple(v) for k, v in splits.items()},
      read=domain.BuildReader(str(build_dir / "images.npy")),
      metadata={"source": "emoji", "build": build_dir.name, "categories": list(chosen),
                "packages": meta["packages"], "renderer": meta.get("renderer"),
                "images_sha256": meta["images_sha256"], "image_size": config["size"]},
  )
