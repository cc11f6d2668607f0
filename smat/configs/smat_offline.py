"""SMAT on the multi-domain offline benchmark (the main job's; 2 CPU cores).

  smat reproduce                                   # builds, pre-trains, meta-trains, compares
  smat meta-train --config smat_offline --workdir runs/smat_offline

Meta-Dataset's shape on drawn images: tasks from the training classes of three ID sources of
different kinds — glyphs:id (18 scripts), emoji:id (6 emoji categories, colour) and icons:id
(icon concepts, line drawings) — validated on their validation classes, tested on their test
classes and on held-out domains of each kind (glyphs:ood, emoji:ood, fashion_mnist). θ_pre is
`pretrain_glyphs` (supervised on the glyph pool, classes no task ever draws), as the paper's is
DINO on ImageNet, one of Meta-Dataset's own sources: meta-tuning has the most to add on the
sources θ_pre never saw.

Everything else is `smat_glyphs`'s, with two choices made on the ID validation classes
(`python -m experiments.regime`, experiments/results/regime_offline.md): δ lr 1e-3 (1e-2 cost
glyphs 4–6 points) and random crops of 60–100% of the image (P>M>F's 8–100% crops a 32-px
letter to a few strokes).

Variants: `:smoke` (seconds; tests and CI), `:fullnoise` (training gates with u ~ U(0, 1)),
`:long` (3 × the tasks, the schedules that count tasks scaled with them).
"""

from smat.config import sibling

ID = "glyphs:id,emoji:id,icons:id"
OOD = "glyphs:ood,emoji:ood,fashion_mnist"


def get_config(arg=None):
  c = sibling(__file__, "smat_glyphs.py", arg)
  c.data.train = ID
  c.data.val = ID
  c.data.test = f"{ID},{OOD}"
  c.augment.crop_scale = (0.6, 1.0)
  c.optim.delta_lr = 1e-3
  return c
