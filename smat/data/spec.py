"""SPEC strings → domains.

  glyphs:id | glyphs:ood | glyphs:<script>   the offline benchmark (built by `smat data prepare`)
  emoji:id | emoji:ood | emoji:<category>    emoji by four design teams (`smat data prepare emoji`)
  icons:id                                   icon concepts, 30 icon sets (`smat data prepare icons`)
  fashion_mnist                              Debian's dataset-fashion-mnist (OOD)
  folder:<path>                              root/<class>/<images> (OOD)
  tfds:<name>[:<split>]                      TensorFlow Datasets (see sources/tfds_source.py)
  md_h5:<dir>:<source>                       P>M>F's Meta-Dataset .h5 files
Several specs may be joined with commas.
"""

from __future__ import annotations

import os
from pathlib import Path

from smat.data.domain import Domain
from smat.errors import DataError

FORMS = ("glyphs:id", "glyphs:ood", "glyphs:<script>", "emoji:id", "emoji:ood",
         "emoji:<category>", "icons:id", "fashion_mnist", "folder:<path>",
         "tfds:<name>[:<split>]", "md_h5:<dir>:<source>",
         "folder:<path>?split=70/15/15 (or tfds:…?split=…: a class split for meta-training)")


def default_data_dir() -> str:
  return os.environ.get("SMAT_DATA_DIR", str(Path("~/.cache/smat").expanduser()))


def load_domain(spec: str, data_dir: str | None = None, skip_corrupt: bool = False,
                seed: int = 0, grouped: bool = False) -> Domain:
  """One SPEC (no commas) → its Domain (`?options`: `smat.data.class_split`)."""
  data_dir = data_dir or default_data_dir()
  from smat.data import class_split

  base, options = class_split.parse(spec.strip())
  if options:
    if not base.startswith(("folder:", "tfds:")):
      raise DataError(f"{spec}: options after '?' (a class split for meta-training) are for "
                      f"folder: and tfds: domains; the other sources have their own splits")
    domain = load_domain(base, data_dir, skip_corrupt, seed, grouped="groups" in options)
    return class_split.apply(domain, options, spec.strip())
  kind, _, rest = spec.strip().partition(":")
  if kind == "glyphs" and rest:
    from smat.data.sources import glyphs

    return glyphs.load_domains(glyphs.find_build(data_dir), rest)
  if kind == "emoji" and rest:
    from smat.data.sources import emoji

    return emoji.load_domains(emoji.find_build(data_dir), rest)
  if kind == "icons" and rest:
    from smat.data.sources import icons

    return icons.load_domains(icons.find_build(data_dir), rest)
  if kind == "fashion_mnist" and not rest:
    from smat.data.sources import fashion_mnist

    return fashion_mnist.load(os.environ.get("SMAT_FASHION_MNIST_DIR"))
  if kind == "folder" and rest:
    from smat.data.sources import folder

    return folder.load(rest, skip_corrupt=skip_corrupt, grouped=grouped)
  if kind == "tfds" and rest:
    from smat.data.sources import tfds_source

    return tfds_source.load(rest, data_dir=os.environ.get("TFDS_DATA_DIR"), seed=seed)
  if kind == "md_h5" and ":" in rest:
    from smat.data.sources import md_h5

    root, source = rest.rsplit(":", 1)
    return md_h5.load(root, source)
  raise DataError(f"unknown data SPEC {spec!r}; expected one of: {', '.join(FORMS)} "
                  f"(comma-separate several)")


def load_domains(specs: str, data_dir: str | None = None, skip_corrupt: bool = False,
                 seed: int = 0) -> list[Domain]:
  """A comma-separated SPEC list → domains, in order."""
  parts = [s for s in specs.split(",") if s.strip()]
  if not parts:
    raise DataError(f"empty data SPEC; expected one of: {', '.join(FORMS)}")
  return [load_domain(s, data_dir, skip_corrupt, seed) for s in parts]
