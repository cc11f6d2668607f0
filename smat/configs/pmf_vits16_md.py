"""PMF (P>M>F: dense ProtoNet meta-tuning of the whole backbone), DINO ViT-S/16, Meta-Dataset, 128 px (GPU).

  smat meta-train --config pmf_vits16_md --workdir runs/pmf_vits16_md

smat_vits16_md with method "pmf": same backbone, episodes, augmentation, length and
per-epoch schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_vits16_md.py", arg)
  c.method = "pmf"
  return c
