"""SoftMerge (M dense experts merged by the router; no gates) on the multi-domain offline benchmark.

  smat meta-train --config softmerge_offline --workdir runs/softmerge_offline

smat_offline with method "softmerge": same router, inner step, teachers, episodes,
augmentation and schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_offline.py", arg)
  c.method = "softmerge"
  return c
