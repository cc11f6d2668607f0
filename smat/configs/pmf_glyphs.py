"""PMF (P>M>F: dense ProtoNet meta-tuning of the whole backbone) on the offline glyphs benchmark.

  smat meta-train --config pmf_glyphs --workdir runs/pmf_glyphs

smat_glyphs with method "pmf": same backbone, episodes, augmentation, length and
schedule (the per-epoch schedule on δ, the only group PMF has).
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_glyphs.py", arg)
  c.method = "pmf"
  return c
