"""PMF (P>M>F: dense ProtoNet meta-tuning of the whole backbone), DINO ViT-S/16, Meta-Dataset, 128 px (GPU).

  smat meta-train --config configs/pmf_vits16_md.py --workdir runs/pmf_vits16_md

configs/smat_vits16_md.py with method "pmf": same backbone, episodes, augmentation, length and
per-epoch schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_vits16_md.py", arg)
  c.method = "pmf"
  return c
