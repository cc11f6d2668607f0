"""PMF (dense ProtoNet meta-tuning of the whole backbone) on the multi-domain offline benchmark.

  smat meta-train --config pmf_offline --workdir runs/pmf_offline

smat_offline with method "pmf": same backbone, episodes, augmentation, length and schedule.
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_offline.py", arg)
  c.method = "pmf"
  return c
