"""SoftMerge (M dense experts merged by the router; no gates, τ = 0), DINO ViT-S/16, Meta-Dataset, 128 px (GPU).

  smat meta-train --config softmerge_vits16_md --workdir runs/softmerge_vits16_md

smat_vits16_md with method "softmerge": same backbone, episodes, augmentation, length
and schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_vits16_md.py", arg)
  c.method = "softmerge"
  return c
