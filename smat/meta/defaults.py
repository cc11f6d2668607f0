"""Default meta-training config: the paper's ViT-S/16 Meta-Dataset values, every constant named.

Config files in smat/configs/ start from `base(method)` and change what their experiment changes;
`apply_variants(config, arg)` handles the `:smoke` / `:fullnoise` suffixes they all accept.
"""

from __future__ import annotations

import ml_collections

from smat.data.episodes import TEST_RESIZE_RATIO
from smat.meta import gates

MD_TRAIN = ",".join(f"tfds:meta_dataset/{s}" for s in (
    "ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower"))
# Meta-Dataset's test sources: the 8 training sources' test classes and the 2 held-out sources.
MD_TEST = MD_TRAIN + ",tfds:meta_dataset/traffic_sign,tfds:meta_dataset/mscoco"
MD_H5_ENV = "SMAT_MD_H5_DIR"  # where P>M>F's converted .h5 files are, for the `h5` variant


def base(method: str = "smat") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""  # empty: $SMAT_DATA_DIR or ~/.cache/smat
  c.method = method  # "smat" | "softmerge" | "pmf"

  c.backbone = ml_collections.ConfigDict()
  c.backbone.path = ""  # backbone dir (smat import-backbone / pretrain) or .safetensors
  c.backbone.format = ""  # for .safetensors: "timm" | "hf"
  c.backbone.arch = ""  # for .safetensors: "vit_s16" | "vit_b16"
  c.backbone.dtype = "float32"  # "bfloat16": bf16 compute, float32 master values
  c.backbone.remat = False

  c.data = ml_collections.ConfigDict()
  c.data.train = MD_TRAIN  # meta-training domains (train classes)
  c.data.val = MD_TRAIN  # validation episodes (val classes)
  c.data.test = MD_TEST  # what `smat evaluate` tests when --domains is not given
  c.data.image_size = 128
  # Validation and test images: resized to round(ratio · image_size), centre-cropped to
  # image_size (146 → 128, P>M>F's and SMAT's test transform); 1.0: the whole image, no crop.
  c.data.test_resize_ratio = TEST_RESIZE_RATIO
  c.data.sampler = "md"  # Meta-Dataset variable-way variable-shot, or "fixed"
  c.data.ways = 5  # fixed sampler only
  c.data.shots = 5
  c.data.queries = 10
  c.data.max_ways = 50  # md sampler
  c.data.max_support = 500
  c.data.max_support_per_class = 100  # a class's contribution to the support budget
  c.data.cap_shots_per_class = False  # True: also at most max_support_per_class shots per class
  c.data.max_leaves_per_node = 392  # class hierarchies: nodes spanning more classes not drawn
  c.data.max_query_per_class = 10
  c.data.meta_batch_size = 4  # tasks per update

  # Meta-training episodes' augmentation on device (P>M>F's recipe, every method): random resized
  # crop back to data.image_size, colour jitter, horizontal flip. Evaluation images never are.
  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.crop_scale = (0.08, 1.0)  # area fraction of the random crop
  c.augment.crop_ratio = (3 / 4, 4 / 3)  # its aspect ratio
  c.augment.brightness = 0.4
  c.augment.contrast = 0.4
  c.augment.saturation = 0.4
  c.augment.flip_prob = 0.5
  c.data.loader_threads = 4
  c.data.prefetch = 4

  c.experts = ml_collections.ConfigDict()
  c.experts.num_experts = 8  # M
  c.experts.target_sparsity = 0.9  # τ (ViT-B: 0.95)
  # u ~ U(0.5 ± w): the authors' 1e-6 (what produced the paper's numbers); `:fullnoise` is
  # Louizos et al.'s U(0, 1). Either way the budget holds for the deterministic meta-test masks.
  c.experts.gate_noise = gates.REFERENCE_NOISE
  c.experts.structured = False  # one gate per input column of each dense kernel
  c.experts.freeze_embeddings = False
  # The experts' masks: "learned" (SMAT's hard-concrete gates and Lagrangian), or a hand-designed
  # strategy at the same budget τ (smat/sparsity): "random", "map", "influence", "selfpruner",
  # "circuit".
  c.experts.masks = "learned"

  c.sparsity = ml_collections.ConfigDict()  # schedules of the mask strategies
  c.sparsity.start = 0.1  # fraction of the steps: dense warm-up of δ before it
  c.sparsity.end = 0.5  # fraction of the steps: budget reached, masks frozen from here
  c.sparsity.every = 10  # map: steps between refreshes of the kept set (Δt); circuit: K
  c.sparsity.normalize = "matrix"  # map: magnitude attention per tensor, or "global"
  c.sparsity.window = 10  # influence: steps averaged into one influence score (ΔT)
  c.sparsity.beta1 = 0.85  # influence: EMA of the importance
  c.sparsity.beta2 = 0.95  # influence: EMA of the uncertainty
  c.sparsity.group_size = 64  # circuit: MLP hidden units per node of the circuit graph
  c.sparsity.node_weighted = False  # circuit: node-weighted rescoring of the edge scores
  c.sparsity.rates = ""  # selfpruner: per-block densities "r1,...,rL,r_rest" (searched); "": uniform

  c.inner = ml_collections.ConfigDict()
  c.inner.lr = 1e-3  # one first-order SGD step on the support

  c.teacher = ml_collections.ConfigDict()
  c.teacher.lr = 5e-3  # the dense teacher's SGD step on the query
  c.teacher.temperature = 2.0  # T of the distillation
  c.teacher.direction = "reverse"  # KL(student‖teacher) as the authors' code; or "forward"
  c.teacher.weight = 0.25  # loss = (1 − w)·CE + w·KD

  c.router = ml_collections.ConfigDict()
  c.router.temperature_start = 5.0  # T_sel = max(floor, start − tasks_seen / decay_tasks)
  c.router.temperature_floor = 0.5
  c.router.temperature_decay_tasks = 4000.0
  c.router.logit_weight = 1e-4  # · mean(ℓ²)

  c.optim = ml_collections.ConfigDict()
  c.optim.delta_lr = 1e-4  # ViT-B: 5e-4
  c.optim.delta_momentum = 0.9
  c.optim.delta_weight_decay = 1e-4
  # "epoch": the authors' warm-up/cosine multiplier stepped per epoch on every group, epoch 0 at
  # first_epoch_lr; "step": δ alone, per step, warm-up then cosine to min_lr at the run's end
  # (smat/meta/schedules.py).
  c.optim.schedule = "epoch"
  c.optim.warmup_epochs = 5
  c.optim.cosine_epochs = 50  # "epoch": the cosine's horizon (a 25-epoch run ends at 0.62 × peak)
  c.optim.first_epoch_lr = 1e-6  # "epoch": lr of δ, gates and λ in epoch 0 (< 0: the schedule's)
  c.optim.warmup_lr = 1e-6  # "step" only
  c.optim.min_lr = 1e-6  # "step" only
  c.optim.gate_lr = 1e6
  c.optim.gate_clip = 5.0
  c.optim.lambda_lr = 2e-3
  c.optim.router_lr = 1e-4
  c.optim.router_weight_decay = 1e-2
  c.optim.router_clip = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 25  # ViT-B: 50
  c.train.episodes_per_epoch = 2000
  c.train.log_every = 50
  c.train.keep_checkpoints = 2
  # Tasks each device runs at a time (0: its whole share of the meta-batch). Fewer run in
  # sequential chunks, each recomputed in the backward pass: activation memory ÷ chunks for one
  # more forward; the update is the same.
  c.train.tasks_at_once = 0

  c.val = ml_collections.ConfigDict()
  c.val.episodes = 120  # fixed validation episodes per source, zero-shot after every epoch
  c.val.batch_size = 4
  return c


VARIANTS = ("smoke", "fullnoise", "h5", "long")


def h5_specs(specs: str, directory: str) -> str:
  """tfds:meta_dataset/<source> SPECs → md_h5:<directory>:<source> (P>M>F's files)."""
  return ",".join(f"md_h5:{directory}:{s.removeprefix('tfds:meta_dataset/')}"
                  if s.startswith("tfds:meta_dataset/") else s for s in specs.split(","))


def scale_length(c: ml_collections.ConfigDict, tasks: float, epochs: float = 1.0) -> None:
  """The run with `tasks` × its meta-training tasks over `epochs` × its epochs: the per-epoch
  schedule (warm-up, cosine horizon) scales with the epochs, the router temperature's decay with
  the tasks (T_sel anneals over the same fraction of the run), and the tasks per epoch make up
  the rest, a multiple of the meta-batch."""
  new_epochs = max(1, round(c.train.epochs * epochs))
  total = c.train.epochs * c.train.episodes_per_epoch * tasks
  batch = c.data.meta_batch_size
  c.train.episodes_per_epoch = max(batch, round(total / new_epochs / batch) * batch)
  c.optim.warmup_epochs = round(c.optim.warmup_epochs * new_epochs / c.train.epochs)
  c.optim.cosine_epochs = max(1, round(c.optim.cosine_epochs * new_epochs / c.train.epochs))
  c.train.epochs = new_epochs
  c.router.temperature_decay_tasks *= tasks


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`arg` = comma-separated variants: `smoke` (seconds, for tests/CI), `fullnoise` (training
  gates with u ~ U(0, 1), Louizos et al., instead of the authors' 0.5 ± 1e-6), `h5` (the
  Meta-Dataset sources read from P>M>F's .h5 files under $SMAT_MD_H5_DIR, default data/md_h5,
  instead of the TFDS builders), `long` (3 × the tasks in the same epochs, `scale_length`)."""
  variants = [v for v in (arg or "").split(",") if v]
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown config variant(s) {sorted(unknown)}; use {' and/or '.join(VARIANTS)}")
  if "fullnoise" in variants:
    c.experts.gate_noise = gates.FULL_NOISE
  if "h5" in variants:
    import os

    directory = os.environ.get(MD_H5_ENV, "data/md_h5")
    for field in ("train", "val", "test"):
      c.data[field] = h5_specs(c.data[field], directory)
  if "long" in variants:
    scale_length(c, tasks=3.0)
  if "smoke" in variants:
    c.data.sampler = "fixed"
    c.data.ways, c.data.shots, c.data.queries = 3, 1, 2
    c.data.meta_batch_size = 2
    c.data.loader_threads = 1
    c.experts.num_experts = min(c.experts.num_experts, 2)
    c.train.epochs = 2
    c.train.episodes_per_epoch = 4
    c.train.log_every = 1
    c.optim.warmup_epochs = 1
    c.val.episodes = 4
    c.val.batch_size = 2
  return c
