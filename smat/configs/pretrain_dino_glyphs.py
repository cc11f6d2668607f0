"""Self-supervised (DINO) pre-training of the small backbone on an unlabeled glyph pool (2 CPU cores).

  smat pretrain --config pretrain_dino_glyphs --workdir runs/dino_try

No label is read: the pool is the images of `data.pool` (empty: `data.train`), its
`data.pool_split` classes (the glyphs:id letters set apart for θ_pre, disjoint from the
meta-training classes). Writes <workdir>/backbone (the teacher's backbone, as
DINO releases), TensorBoard scalars, metrics.jsonl (loss, teacher entropy per image and of the
batch mean: both near 0 or both near log K means collapse) and fewshot.json: zero-shot ProtoNet
accuracy (5-way 1-shot and 5-shot, 600 episodes, 95% CI) on the glyphs:id test classes and on
the held-out glyphs:ood scripts, the same report as `pretrain_glyphs`.
Expected (2 CPU cores): see docs/results.md, "The pre-trained backbone", for the measured time and accuracies.

Changed from DINO's ViT-S/16 ImageNet recipe for a 128-wide ViT, 32-px glyphs and minutes of
CPU: a smaller head (hidden 1024, bottleneck 256, K = 2048 prototypes, not 2048/256/65,536);
6 local crops of 16 px (not 8 of 96 px at 224); schedules in steps (warm-ups of a few hundred
steps, not 10 and 30 epochs); the lr is the peak itself (no batch/256 scaling); no flip (a
mirrored letter is often another letter), no solarisation (it erases white-on-black glyphs),
blur σ in pixels of the crop ∈ (0.1, 1.0) (DINO's (0.1, 2.0) at 224 px).

`pretrain_dino_glyphs:smoke` is the same run shrunk to seconds (tests, CI).
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data_dir = ""  # empty: $SMAT_DATA_DIR or ~/.cache/smat

  config.data = ml_collections.ConfigDict()
  config.data.train = "glyphs:id"  # the meta-training domains (provenance; the default pool)
  config.data.pool = ""  # the unlabeled pool (SPEC); empty: data.train
  config.data.pool_split = "pool"  # images of the pool's classes of this split
  config.data.image_size = 32
  config.data.loader_threads = 2
  config.data.prefetch = 4

  config.backbone = ml_collections.ConfigDict()
  config.backbone.arch = "vit_mini_p4"
  config.backbone.dtype = "float32"
  config.backbone.remat = False

  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.objective = "dino"
  config.pretrain.steps = 500  # ≈ 1.1 epochs of the 30,020-image pool
  config.pretrain.batch_size = 64
  config.pretrain.lr = 1e-3  # peak, after the linear warm-up
  config.pretrain.min_lr = 1e-6
  config.pretrain.warmup_steps = 50
  config.pretrain.weight_decay = 0.04  # cosine from this ...
  config.pretrain.weight_decay_end = 0.4  # ... to this, as DINO
  config.pretrain.grad_clip = 3.0  # per parameter (DINO's clip_gradients); 0: off
  config.pretrain.log_every = 50
  config.pretrain.checkpoint_every = 100
  config.pretrain.keep_checkpoints = 2

  config.pretrain.dino = d = ml_collections.ConfigDict()
  d.hidden_dim = 1024
  d.bottleneck_dim = 256
  d.out_dim = 2048  # K prototypes
  d.head_layers = 3
  d.norm_last_layer = True
  d.student_temp = 0.1
  d.warmup_teacher_temp = 0.04  # linear from this ...
  d.teacher_temp = 0.07  # ... to this over warmup_teacher_temp_steps, then constant
  d.warmup_teacher_temp_steps = 150
  d.center_momentum = 0.9
  d.momentum_teacher = 0.996  # cosine to 1 over the run
  d.freeze_last_layer_steps = 50  # DINO: the first epoch (1% of its run)
  d.global_crop_scale = (0.4, 1.0)  # 2 global crops at data.image_size
  d.local_crop_scale = (0.05, 0.4)
  d.local_crops = 6
  d.local_size = 16  # a multiple of the patch size
  d.flip_prob = 0.0
  d.jitter_prob = 0.8
  d.brightness = 0.4
  d.contrast = 0.4
  d.saturation = 0.2
  d.gray_prob = 0.2
  d.blur_sigma = (0.1, 1.0)
  d.global_blur_prob = (1.0, 0.1)  # first, second global crop
  d.local_blur_prob = 0.5
  d.solarize_prob = 0.0  # second global crop only (DINO: 0.2)

  config.eval = ml_collections.ConfigDict()
  config.eval.domains = "glyphs:id,glyphs:ood"
  config.eval.ways = 5
  config.eval.shots = (1, 5)
  config.eval.queries = 15
  config.eval.episodes = 600

  if arg == "smoke":
    config.pretrain.steps = 6
    config.pretrain.batch_size = 8
    config.pretrain.warmup_steps = 2
    config.pretrain.log_every = 2
    config.pretrain.checkpoint_every = 4
    d.hidden_dim = 64
    d.bottleneck_dim = 32
    d.out_dim = 64
    d.local_crops = 2
    d.warmup_teacher_temp_steps = 3
    d.freeze_last_layer_steps = 2
    config.eval.episodes = 10
    config.eval.queries = 5
  return config
