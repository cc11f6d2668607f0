"""One episode as a picture: a row of support images per class, then the query images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from smat.data.episodes import Episode

_GAP = 2
_LABEL_WIDTH = 64


def episode_grid(episode: Episode, cell: int = 64, max_per_row: int = 12) -> Image.Image:
  """Rows: 'class k' supports (up to `max_per_row`), then that class's queries."""
  ways = int(episode.class_mask.sum())
  rows: list[tuple[str, list[np.ndarray]]] = []
  for what, images, labels, mask in (
      ("support", episode.support_images, episode.support_labels, episode.support_mask),
      ("query", episode.query_images, episode.query_labels, episode.query_mask)):
    for k in range(ways):
      picked = images[(labels == k) & mask][:max_per_row]
      rows.append((f"{what} {k}", list(picked)))
  columns = max((len(images) for _, images in rows), default=1)
  width = _LABEL_WIDTH + columns * (cell + _GAP)
  canvas = Image.new("RGB", (width, len(rows) * (cell + _GAP)), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for r, (label, images) in enumerate(rows):
    y = r * (cell + _GAP)
    draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0))
    for c, image in enumerate(images):
      tile = Image.fromarray(np.asarray(image)).resize((cell, cell), Image.Resampling.NEAREST)
      canvas.paste(tile, (_LABEL_WIDTH + c * (cell + _GAP), y))
  return canvas
