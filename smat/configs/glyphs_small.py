"""Small-scale SMAT on the offline glyphs benchmark: runs on 2 CPU cores.

  smat data prepare glyphs
  python -m benchmarks.loader_throughput --config glyphs_small

Variants: `glyphs_small:smoke` shrinks everything for tests and CI.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data_dir = ""  # empty: $SMAT_DATA_DIR or ~/.cache/smat

  config.data = ml_collections.ConfigDict()
  config.data.train = "glyphs:id"  # meta-training domains (their train classes)
  config.data.val = "glyphs:id"  # validation episodes (val classes)
  config.data.image_size = 32
  config.data.test_resize_ratio = 146 / 128  # val/test images: resize 36, centre-crop 32
  config.data.sampler = "md"  # "md" (variable-way variable-shot) or "fixed"
  config.data.ways = 5  # fixed sampler only
  config.data.shots = 5
  config.data.queries = 15
  config.data.max_ways = 50  # md sampler
  config.data.max_support = 500
  config.data.max_support_per_class = 100  # a class's contribution to the support budget
  config.data.cap_shots_per_class = False  # True: also at most that many shots per class
  config.data.max_leaves_per_node = 392  # class hierarchies: nodes spanning more not drawn
  config.data.max_query_per_class = 10
  config.data.meta_batch_size = 4
  config.data.loader_threads = 2
  config.data.prefetch = 4

  if arg == "smoke":
    config.data.max_ways = 10
    config.data.max_support = 50
    config.data.meta_batch_size = 2
  return config
