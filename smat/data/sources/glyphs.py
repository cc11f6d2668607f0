"""The offline *glyphs* benchmark: an Omniglot-like, multi-domain few-shot benchmark rendered
from installed fonts, so the whole pipeline runs on machines that cannot download datasets.

* domain = a script (alphabet), class = a letter of it, instance = the letter drawn by one font
  file (family × style) with seeded affine jitter, stroke-width change and position/scale noise.
* A letter is kept when at least `min_fonts` font files draw it; every class gets exactly
  `instances` images, cycling over its fonts (like Omniglot's 20 drawers).
* In-distribution scripts split their letters into train/val/test classes; held-out scripts
  are used only for OOD evaluation.

The build is a pure function of (font files, `GlyphsConfig`, renderer versions): same fonts +
seed → byte-identical files, for any worker count (each script is rendered whole by one worker,
single-threaded, and the results are put back in script order). The font package and file
versions and the renderer's library versions are recorded in the metadata.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import unicodedata
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from smat.data import domain
from smat.data.domain import (Domain, ImageClass, split_classes_by_fraction,
                               write_build)
from smat.errors import DataError

FONT_DIR = "/usr/share/fonts/truetype/noto"
FONT_PACKAGE = "fonts-noto-core"
FORMAT_VERSION = 1

# Scripts held out for OOD evaluation: visually unlike each other and unlike the ID scripts'
# families (Ethiopic syllabary, Adlam, Hebrew, Sinhala, Tifinagh geometric letters).
DEFAULT_OOD_SCRIPTS = ("ADLAM", "ETHIOPIC", "HEBREW", "SINHALA", "TIFINAGH")

# Unicode names look like "<SCRIPT> [CAPITAL|SMALL] LETTER <NAME>".
_LETTER_NAME = re.compile(
    r"^(.*?) (?:CAPITAL |SMALL )?(?:LETTER|SYLLABLE|SYLLABICS|CHARACTER|VOWEL|CONSONANT)\b")
_NOT_A_SCRIPT = frozenset({
    "MODIFIER", "COMBINING", "FULLWIDTH", "HALFWIDTH", "CIRCLED", "PARENTHESIZED", "SQUARED",
    "NEGATIVE", "SUBSCRIPT", "SUPERSCRIPT", "MATHEMATICAL", "SMALL", "CAPITAL", "OBJECT",
    "REPLACEMENT", "ZERO",
})


@dataclasses.dataclass(frozen=True)
class GlyphsConfig:
  """Everything the build depends on besides the font files themselves."""

  size: int = 32  # stored image side, pixels
  instances: int = 20  # images per class
  min_fonts: int = 4  # font files (family × style) that must draw a letter
  min_classes: int = 20  # scripts with fewer letters are dropped
  ood_scripts: tuple[str, ...] = DEFAULT_OOD_SCRIPTS
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  seed: int = 0
  # Jitter, applied per instance at 4× resolution before downsampling.
  max_rotation_deg: float = 12.0
  max_shear: float = 0.25
  scale_range: tuple[float, float] = (0.55, 0.85)  # letter box as a fraction of the image
  max_aspect_change: float = 0.15
  max_shift: float = 0.1  # fraction of the image side
  stroke_probs: tuple[float, float, float] = (0.3, 0.4, 0.3)  # thinner / unchanged / bolder
  # Restrict the build (tests, quick looks): only these scripts, at most this many letters each.
  scripts: tuple[str, ...] | None = None
  max_classes_per_script: int | None = None

  def cache_key(self, fonts: Sequence[dict[str, Any]]) -> str:
    payload = json.dumps({"config": dataclasses.asdict(self), "fonts": list(fonts),
                          "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Fonts and letters.


def font_files(font_dir: str = FONT_DIR) -> list[Path]:
  files = sorted(Path(font_dir).glob("*.ttf")) + sorted(Path(font_dir).glob("*.otf"))
  if not files:
    raise DataError(
        f"no fonts found in {font_dir}: the glyphs benchmark renders Noto fonts; install them "
        f"with `apt-get install {FONT_PACKAGE}` (or pass --font-dir)")
  return files


def describe_fonts(files: Sequence[Path]) -> list[dict[str, Any]]:
  """File name, size and version string of each font: recorded in the dataset metadata."""
  from fontTools.ttLib import TTFont

  described = []
  for path in files:
    font = TTFont(path, lazy=True)
    version = font["name"].getDebugName(5) or f"{font['head'].fontRevision:.3f}"
    described.append({"file": path.name, "bytes": path.stat().st_size, "version": version})
  return described


def script_of(char: str) -> str | None:
  """Script name of a plain letter from its Unicode name, or None for anything else.

  Letters with a canonical decomposition (accented variants) are dropped: they would make
  near-duplicate classes.
  """
  category = unicodedata.category(char)
  if not category.startswith("L") or category == "Lm" or unicodedata.decomposition(char):
    return None
  match = _LETTER_NAME.match(unicodedata.name(char, ""))
  if not match or match.group(1) in _NOT_A_SCRIPT:
    return None
  return match.group(1)


def letters_by_script(files: Sequence[Path], config: GlyphsConfig) -> dict[str, list[tuple[int, list[str]]]]:
  """script → sorted [(codepoint, [font files drawing it])] for letters with ≥ min_fonts fonts."""
  from fontTools.ttLib import TTFont

  coverage: dict[int, list[str]] = {}
  for path in files:
    for codepoint in TTFont(path, lazy=True).getBestCmap():
      coverage.setdefault(codepoint, []).append(str(path))
  scripts: dict[str, list[tuple[int, list[str]]]] = {}
  for codepoint in sorted(coverage):
    fonts = coverage[codepoint]
    script = script_of(chr(codepoint))
    if script is None or len(fonts) < config.min_fonts:
      continue
    scripts.setdefault(script, []).append((codepoint, fonts))
  # Sub-blocks named after their script ("GEORGIAN MTAVRULI", "KHMER INDEPENDENT") join it.
  for name in sorted(scripts, key=len, reverse=True):
    head = name.split(" ")[0]
    if head != name and head in scripts:
      scripts[head] = sorted(scripts[head] + scripts.pop(name))
  if config.scripts is not None:
    unknown = sorted(set(config.scripts) - set(scripts))
    if unknown:
      raise DataError(f"glyphs: unknown script(s) {unknown}; available: {sorted(scripts)}")
    scripts = {s: scripts[s] for s in config.scripts}
  scripts = {s: v for s, v in scripts.items() if len(v) >= config.min_classes}
  if config.max_classes_per_script:
    scripts = {s: v[:config.max_classes_per_script] for s, v in scripts.items()}
  return dict(sorted(scripts.items()))


# --------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=64)
def _font(path: str, pixels: int) -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(path, pixels)


def ink_of(char: str, font_path: str, pixels: int) -> Image.Image | None:
  """The letter drawn white-on-black and cropped to its ink, or None if the font draws nothing."""
  font = _font(font_path, pixels)
  canvas = Image.new("L", (3 * pixels, 3 * pixels), 0)
  ImageDraw.Draw(canvas).text((1.5 * pixels, 1.5 * pixels), char, fill=255, font=font, anchor="mm")
  box = canvas.getbbox()
  return None if box is None else canvas.crop(box)


def jitter_affine(rng: np.random.Generator, ink_size: tuple[int, int], side: int,
                  config: GlyphsConfig) -> tuple[float, ...]:
  """Inverse affine map (output → ink pixel) placing the letter with random pose in the image."""
  width, height = ink_size
  fit = rng.uniform(*config.scale_range) * side / max(width, height)
  aspect = 1.0 + rng.uniform(-config.max_aspect_change, config.max_aspect_change)
  angle = np.deg2rad(rng.uniform(-config.max_rotation_deg, config.max_rotation_deg))
  shear = rng.uniform(-config.max_shear, config.max_shear)
  shift = rng.uniform(-config.max_shift, config.max_shift, size=2) * side
  # Forward: ink (centred) → scale (x: fit·aspect, y: fit/aspect) → shear → rotate → shift.
  scale = np.diag([fit * aspect, fit / aspect])
  shear_m = np.array([[1.0, shear], [0.0, 1.0]])
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  forward = rot @ shear_m @ scale
  inverse = np.linalg.inv(forward)
  centre_out = np.array([side / 2, side / 2]) + shift
  centre_in = np.array([width / 2, height / 2])
  offset = centre_in - inverse @ centre_out
  return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def render_instance(ink: Image.Image, seed_words: Sequence[int],
                    config: GlyphsConfig) -> np.ndarray | None:
  """One jittered instance of a letter's ink (from `ink_of` at 4 × size): uint8 [size, size]
  (0 = paper, 255 = ink), or None when the jitter leaves nothing visible."""
  rng = np.random.default_rng(np.random.SeedSequence(list(seed_words)))
  side = 4 * config.size
  affine = jitter_affine(rng, ink.size, side, config)
  image = ink.transform((side, side), Image.Transform.AFFINE, affine,
                        resample=Image.Resampling.BILINEAR, fillcolor=0)
  stroke = rng.choice(3, p=np.asarray(config.stroke_probs))
  radius = int(rng.integers(1, 3)) * 2 + 1
  if stroke == 0:
    image = image.filter(ImageFilter.MinFilter(radius))
  elif stroke == 2:
    image = image.filter(ImageFilter.MaxFilter(radius))
  image = image.resize((config.size, config.size), Image.Resampling.BOX)
  array = np.asarray(image, dtype=np.uint8)
  return array if array.max() > 0 else None


def render_class(codepoint: int, fonts: Sequence[str], config: GlyphsConfig) -> np.ndarray | None:
  """All `instances` images of one letter [instances, size, size], or None if too few fonts draw it."""
  inks = [ink for f in fonts if (ink := ink_of(chr(codepoint), f, 4 * config.size)) is not None]
  if len(inks) < config.min_fonts:
    return None
  images = []
  attempt = 0
  while len(images) < config.instances:
    ink = inks[attempt % len(inks)]
    image = render_instance(ink, (config.seed, codepoint, attempt), config)
    attempt += 1
    if image is not None:
      images.append(image)
    elif attempt > 4 * config.instances:
      return None
  return np.stack(images)


def _render_script(args: tuple[str, list[tuple[int, list[str]]], GlyphsConfig]):
  script, letters, config = args
  kept = []
  for codepoint, fonts in letters:
    images = render_class(codepoint, fonts, config)
    if images is not None:
      kept.append((codepoint, images))
  return script, kept


# --------------------------------------------------------------------------------------------
# Build and load.


def _debian_version(package: str) -> str | None:
  try:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                         capture_output=True, text=True, check=False)
  except FileNotFoundError:
    return None
  return out.stdout.strip() or None


def renderer_versions() -> dict[str, str | None]:
  """Libraries that draw the glyphs (FreeType rasterises, Pillow transforms and filters, numpy
  draws the jitter, fontTools reads the cmaps): another version may change the bytes, which
  `images_sha256` then shows. Recorded, not in the cache key, so an upgrade keeps old builds."""
  import importlib.metadata as metadata

  from PIL import features

  versions = {name: metadata.version(name) for name in ("pillow", "fonttools", "numpy")}
  return {**versions, "freetype": features.version("freetype2")}


def _build_dir(data_dir: str | os.PathLike, config: GlyphsConfig, fonts) -> Path:
  return Path(data_dir) / "glyphs" / f"s{config.size}-{config.cache_key(fonts)}"


def dataset_dir(data_dir: str | os.PathLike, config: GlyphsConfig, font_dir: str = FONT_DIR) -> Path:
  return _build_dir(data_dir, config, describe_fonts(font_files(font_dir)))


def build(data_dir: str | os.PathLike, config: GlyphsConfig = GlyphsConfig(),
          font_dir: str = FONT_DIR, workers: int | None = None, progress: bool = True) -> Path:
  """Render the benchmark into `data_dir/glyphs/<key>/` unless it is already there.

  Files: `images.npy` uint8 [N, size, size] and `metadata.json` (classes, splits, fonts,
  config, sha256 of the images). `metadata.json` is written last, atomically: its presence
  means the build is complete.
  """
  files = font_files(font_dir)
  fonts = describe_fonts(files)
  out = _build_dir(data_dir, config, fonts)
  if (out / "metadata.json").exists():
    return out
  scripts = letters_by_script(files, config)
  jobs = [(s, letters, config) for s, letters in scripts.items()]
  workers = workers or min(len(jobs), os.cpu_count() or 1)
  rendered: dict[str, list[tuple[int, np.ndarray]]] = {}
  from tqdm import tqdm
  # spawn, not fork: forking a process that already runs JAX's threads can deadlock.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    # Largest scripts first so the pool stays busy; results are re-ordered below.
    order = sorted(jobs, key=lambda j: -len(j[1]))
    for script, kept in tqdm(pool.map(_render_script, order), total=len(order),
                             desc="render glyphs", unit="script", disable=not progress):
      rendered[script] = kept
  rendered = {s: rendered[s] for s in sorted(rendered) if len(rendered[s]) >= config.min_classes}
  if not rendered:
    raise DataError(f"glyphs: no script has {config.min_classes} letters drawn by "
                    f"{config.min_fonts} fonts in {font_dir}")

  classes, arrays, offset = [], [], 0
  for script, kept in rendered.items():
    for codepoint, images in kept:
      classes.append({"script": script, "codepoint": codepoint, "name": unicodedata.name(chr(codepoint)),
                      "first": offset, "count": len(images)})
      arrays.append(images)
      offset += len(images)
  images = np.concatenate(arrays)
  ood = sorted(set(config.ood_scripts) & set(rendered))
  metadata = {
      "format_version": FORMAT_VERSION,
      "config": dataclasses.asdict(config),
      "font_dir": font_dir,
      "font_package": {"name": FONT_PACKAGE, "version": _debian_version(FONT_PACKAGE)},
      "fonts": fonts,
      "renderer": renderer_versions(),
      "id_scripts": [s for s in rendered if s not in ood],
      "ood_scripts": ood,
      "classes": classes,
      "num_images": int(images.shape[0]),
      "images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
  }
  write_build(out, images, metadata)
  return out


def find_build(data_dir: str | os.PathLike, font_dir: str = FONT_DIR) -> Path:
  """The build that `glyphs:` specs read.

  Order: $SMAT_GLYPHS_BUILD; the default-config build; the only finished build in data_dir.
  """
  try:
    default = dataset_dir(data_dir, GlyphsConfig(), font_dir)
  except DataError:
    default = None  # fonts removed since the build: any finished build still works
  return domain.find_build(data_dir, "glyphs", "glyphs benchmark", default)


def load_domains(build_dir: str | os.PathLike, which: str) -> Domain:
  """`which` = 'id' (all ID scripts), 'ood' (all held-out scripts) or one script name."""
  build_dir = Path(build_dir)
  meta = json.loads((build_dir / "metadata.json").read_text())
  config = meta["config"]
  by_script: dict[str, list[ImageClass]] = {}
  for c in meta["classes"]:
    ids = np.arange(c["first"], c["first"] + c["count"], dtype=np.int64)
    by_script.setdefault(c["script"], []).append(
        ImageClass(name=f"{c['script']}/U+{c['codepoint']:04X}", image_ids=ids, group=c["script"]))
  scripts = {"id": meta["id_scripts"], "ood": meta["ood_scripts"]}.get(which)
  if scripts is None:
    name = which.upper().replace("_", " ")
    if name not in by_script:
      raise DataError(f"glyphs:{which}: no such script; choose id, ood or one of "
                      f"{[s.lower().replace(' ', '_') for s in by_script]}")
    scripts = [name]
  splits: dict[str, list[ImageClass]] = {"pool": [], "train": [], "val": [], "test": []}
  for script in sorted(scripts):
    if script in meta["ood_scripts"]:
      splits["test"].extend(by_script[script])
      continue
    script_splits = split_classes_by_fraction(
        by_script[script], tuple(config["split_fractions"]), seed=[config["seed"], zlib.crc32(script.encode())])
    for split, classes in script_splits.items():
      splits[split].extend(classes)
  return Domain(
      name=f"glyphs:{which}",
      splits={k: tuple(v) for k, v in splits.items()},
      read=domain.BuildReader(str(build_dir / "images.npy"), ink=True),
      metadata={"source": "glyphs", "build": build_dir.name, "scripts": sorted(scripts),
                "fonts": len(meta["fonts"]), "font_package": meta["font_package"],
                "renderer": meta.get("renderer"),
                "images_sha256": meta["images_sha256"], "image_size": config["size"]},
  )
