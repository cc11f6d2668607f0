"""PMF (P>M>F: dense ProtoNet meta-tuning of the whole backbone) on the offline glyphs benchmark.

  smat meta-train --config configs/pmf_glyphs.py --workdir runs/pmf_glyphs

configs/smat_glyphs.py with method "pmf": same backbone, episodes, length and δ schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_glyphs.py", arg)
  c.method = "pmf"
  return c
