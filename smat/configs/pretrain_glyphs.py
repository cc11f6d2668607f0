"""Supervised pre-training of the small backbone on the glyphs:id pool classes (2 CPU cores).

The pool is the half of the ID scripts' training letters set apart for θ_pre: no letter whose
label θ_pre learns is met in meta-training, validation or test.

  smat pretrain --config pretrain_glyphs --workdir runs/demo/pretrain

Writes runs/demo/pretrain/backbone (θ_pre for every later command; `smat reproduce` writes the
same one, and the glyph meta-training configs read it from there), TensorBoard scalars,
metrics.jsonl and fewshot.json: zero-shot ProtoNet accuracy (5-way 1-shot and 5-shot, 600 episodes, 95% CI) on
the glyphs:id test classes and on the held-out glyphs:ood scripts.
Expected (2 CPU cores): see docs/results.md, "The pre-trained backbone", for the measured time and accuracies.

`pretrain_glyphs:smoke` is the same run shrunk to seconds (tests, CI).
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data_dir = ""  # empty: $SMAT_DATA_DIR or ~/.cache/smat

  config.data = ml_collections.ConfigDict()
  config.data.train = "glyphs:id"  # the meta-training domains (provenance; the default pool)
  config.data.pool = ""  # the pre-training domains (SPEC); empty: data.train
  config.data.pool_split = "pool"  # their classes set apart for θ_pre ("train": meta-training's)
  config.data.image_size = 32
  config.data.loader_threads = 2  # batches are read ahead on these threads
  config.data.prefetch = 4

  config.backbone = ml_collections.ConfigDict()
  config.backbone.arch = "vit_mini_p4"
  config.backbone.dtype = "float32"  # or "bfloat16" (compute only; parameters stay float32)
  config.backbone.remat = False

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.objective = "supervised"  # or "dino" (self-supervised: pretrain_dino_glyphs)
  config.pretrain.steps = 900
  config.pretrain.batch_size = 128
  config.pretrain.lr = 2e-3
  config.pretrain.warmup_steps = 100
  config.pretrain.final_lr_fraction = 0.01
  config.pretrain.weight_decay = 0.05
  config.pretrain.grad_clip = 1.0
  config.pretrain.label_smoothing = 0.0
  config.pretrain.cosine_head_scale = 16.0  # cosine classifier (Baseline++); 0: linear head
  config.pretrain.augment = True
  config.pretrain.crop_scale = (0.6, 1.0)
  config.pretrain.color_jitter = 0.2
  config.pretrain.flip_prob = 0.0  # a mirrored letter is often another letter
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 300
  config.pretrain.keep_checkpoints = 2

  config.eval = ml_collections.ConfigDict()
  config.eval.domains = "glyphs:id,glyphs:ood"  # zero-shot report on these domains' test classes
  config.eval.ways = 5
  config.eval.shots = (1, 5)
  config.eval.queries = 15
  config.eval.episodes = 600

  if arg == "smoke":
    config.pretrain.steps = 6
    config.pretrain.batch_size = 16
    config.pretrain.warmup_steps = 2
    config.pretrain.log_every = 2
    config.pretrain.checkpoint_every = 4
    config.eval.episodes = 10
    config.eval.queries = 5
  return config
