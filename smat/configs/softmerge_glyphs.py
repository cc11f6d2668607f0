"""SoftMerge (M dense experts merged by the router; no gates, τ = 0) on the offline glyphs benchmark.

  smat meta-train --config softmerge_glyphs --workdir runs/softmerge_glyphs

smat_glyphs with method "softmerge": same router, inner step, teachers, episodes,
augmentation and schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_glyphs.py", arg)
  c.method = "softmerge"
  return c
