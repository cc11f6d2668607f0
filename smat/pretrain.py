"""Pre-training of the backbone θ_pre: supervised on the training classes, or DINO on a pool.

Machines that cannot download DINO weights still need a θ_pre with a useful few-shot
representation. `config.pretrain.objective` picks how it is learnt:

* "supervised" (`pretrain_glyphs`): the ViT with a linear or cosine head (discarded afterwards)
  by cross-entropy on every image of the pool's classes;
* "dino" (`pretrain_dino_glyphs`): DINO's self-distillation (`smat.dino`) on the same images,
  labels dropped; the teacher's backbone is the θ_pre written, as in DINO.

The pool is `config.data.pool` (empty: `config.data.train`), its `config.data.pool_split`
classes: in the packaged configs the `pool` split, a share of the ID sources' training classes
set apart so that no meta-training, validation or test class's labels reach θ_pre.

Either way the run writes `<workdir>/backbone/` (usable by every command that takes
`--backbone`) and a zero-shot ProtoNet report on the test classes (`<workdir>/fewshot.json`).

Exact resume with nothing but the step: batch `s` is a pure function of (seed, s) (one seeded
permutation of the images per epoch) and the augmentation key is `fold_in(key, s)`, so a run
restarted from its latest checkpoint (which holds the whole state: DINO's teacher and centre
too) replays the same batches and keys.

Resume order: (1) the latest checkpoint in `<workdir>/checkpoints`, (2) a fresh start.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smat import evaluate, protonet, training
from smat.data import augment as aug
from smat.data.episodes import resize
from smat.data.spec import load_domains
from smat.errors import SmatError
from smat.models import checkpoint, vit


class TrainState(NamedTuple):
  params: dict  # {"backbone": ViT params, "head": {"kernel", "bias"}}
  opt_state: optax.OptState
  step: jax.Array


class ClassificationData:
  """Random access to labelled batches of the images of the `split` classes of `domains`."""

  def __init__(self, domains, split: str, image_size: int, batch_size: int, seed: int):
    self.domains = tuple(domains)
    self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
    self.class_names = [f"{domain.name}/{c.name}" for domain in self.domains
                        for c in domain.classes(split)]
    items, labels, label = [], [], 0
    for d, domain in enumerate(self.domains):
      for image_class in domain.classes(split):
        items.extend((d, int(i)) for i in image_class.image_ids)
        labels.extend([label] * image_class.size)
        label += 1
    if not items:
      raise SmatError(f"no {split} images in {', '.join(d.name for d in self.domains)}")
    self.items = items
    self.labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.items)

  @functools.lru_cache(maxsize=4)
  def _order(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, 7, epoch]))
    return rng.permutation(len(self.items))

  def indices(self, step: int) -> np.ndarray:
    """Image indices of batch `step`: consecutive slices of per-epoch permutations."""
    positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    epochs, offsets = np.divmod(positions, len(self.items))
    return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)])

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [B, S, S, 3], labels int32 [B]) of batch `step`."""
    idx = self.indices(step)
    images = np.stack([resize(self.domains[d].read(i), self.image_size)
                       for d, i in (self.items[j] for j in idx)])
    return images, self.labels[idx]


class ImagePool(ClassificationData):
  """The images of the `split` classes of `domains`, labels dropped: DINO's unlabeled pool.
  Batches as `ClassificationData`'s (a pure function of (seed, step))."""

  def batch(self, step: int) -> tuple[np.ndarray]:
    """(images uint8 [B, S, S, 3],) of batch `step`."""
    return (super().batch(step)[0],)


OBJECTIVES = ("supervised", "dino")


def lr_schedule(config) -> optax.Schedule:
  p = config.pretrain
  return optax.warmup_cosine_decay_schedule(0.0, p.lr, p.warmup_steps,
                                            max(p.steps, p.warmup_steps + 1),
                                            end_value=p.lr * p.final_lr_fraction)


def make_optimizer(config) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine decay and global-norm clipping; no decay on biases/norms/embeds."""
  p = config.pretrain
  schedule = lr_schedule(config)
  decay = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", "") == "kernel", params)
  return optax.chain(optax.clip_by_global_norm(p.grad_clip),
                     optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=p.weight_decay,
                                 mask=decay))


def augment_config(config) -> aug.AugmentConfig:
  p = config.pretrain
  return aug.AugmentConfig(crop_scale=tuple(p.crop_scale), crop_ratio=(3 / 4, 4 / 3),
                           brightness=p.color_jitter, contrast=p.color_jitter,
                           saturation=p.color_jitter, flip_prob=p.flip_prob)


def head_logits(head: dict, features: jax.Array, cosine_scale: float) -> jax.Array:
  """Linear head, or (cosine_scale > 0) scale · cos(feature, class weight) as in Baseline++."""
  if cosine_scale > 0:
    return cosine_scale * (protonet.l2_normalize(features, -1, eps=1e-6)
                           @ protonet.l2_normalize(head["kernel"], 0, eps=1e-6))
  return features @ head["kernel"] + head["bias"]


def loss_fn(params, images, labels, key, vit_config: vit.ViTConfig,
            augmentation: aug.AugmentConfig | None, label_smoothing: float,
            cosine_scale: float):
  x = aug.to_float(images)
  if augmentation is not None:
    x = aug.augment(key, x, augmentation)
  features = vit.forward(params["backbone"], vit.preprocess(x, vit_config), vit_config)
  logits = head_logits(params["head"], features, cosine_scale)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  loss = optax.softmax_cross_entropy(logits, targets).mean()
  accuracy = (logits.argmax(-1) == labels).mean()
  return loss, accuracy


def train_step(state: TrainState, images, labels, key, *, optimizer, vit_config,
               augmentation, label_smoothing, cosine_scale):
  """One pure optimiser step; the step's key is fold_in(key, step)."""
  step_key = jax.random.fold_in(key, state.step)
  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, images, labels, step_key, vit_config, augmentation, label_smoothing,
      cosine_scale)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
  return TrainState(params, opt_state, state.step + 1), metrics


def backbone_config(config) -> vit.ViTConfig:
  b = config.backbone
  return vit.get_config(b.arch, image_size=config.data.image_size, dtype=b.dtype, remat=b.remat)


def init_state(config, num_classes: int, optimizer) -> TrainState:
  """Backbone from `vit.init`; head zero-initialised (linear) or N(0, 0.02) (cosine)."""
  vit_config = backbone_config(config)
  key, head_key = jax.random.split(jax.random.key(config.seed))
  shape = (vit_config.width, num_classes)
  kernel = (0.02 * jax.random.normal(head_key, shape) if config.pretrain.cosine_head_scale > 0
            else jnp.zeros(shape))
  params = {"backbone": vit.init(vit_config, key),
            "head": {"kernel": kernel,
                     "bias": jnp.zeros((num_classes,))}}
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def _save(manager, state) -> None:
  import orbax.checkpoint as ocp

  manager.save(int(state.step), args=ocp.args.StandardSave(state._asdict()), force=True)


def _restore(manager, state):
  import orbax.checkpoint as ocp

  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._asdict())
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return type(state)(**restored)


class Objective(NamedTuple):
  """What the shared loop needs of a pre-training objective."""

  data: Any  # .batch(step) -> tuple of host arrays (the step's arguments after the state)
  state: Any  # the initial state (a NamedTuple with a `step`)
  step_fn: Callable  # jitted (state, *batch, key) -> (state, metrics)
  lr: Callable  # step -> learning rate (logged)
  backbone: Callable  # state -> the backbone parameters written as θ_pre
  postfix: dict  # metric -> its short name on the progress bar
  provenance: dict  # extra fields of backbone.json


def pool_of(config) -> tuple[str, str]:
  """(SPEC, split) of the classes θ_pre is pre-trained on: `config.data.pool` (empty:
  `config.data.train`) and `config.data.pool_split` (the packaged configs: "pool", classes
  disjoint from every meta-training, validation and test class; older configs: "train")."""
  return (config.data.get("pool", "") or config.data.train,
          config.data.get("pool_split", "train"))


def supervised_objective(config, vit_config: vit.ViTConfig, replicated) -> Objective:
  """Cross-entropy on the labelled images of the pool's classes."""
  p = config.pretrain
  pool, split = pool_of(config)
  domains = load_domains(pool, config.data_dir or None, seed=config.seed)
  data = ClassificationData(domains, split, config.data.image_size, p.batch_size, config.seed)
  optimizer = make_optimizer(config)
  step_fn = jax.jit(
      functools.partial(train_step, optimizer=optimizer, vit_config=vit_config,
                        augmentation=augment_config(config) if p.augment else None,
                        label_smoothing=p.label_smoothing, cosine_scale=p.cosine_head_scale),
      out_shardings=(replicated, replicated), donate_argnums=0)
  return Objective(data, init_state(config, data.num_classes, optimizer), step_fn,
                   lr_schedule(config), lambda state: state.params["backbone"],
                   {"loss": "loss", "accuracy": "acc"},
                   {"objective": "supervised", "pool": pool, "pool_split": split,
                    "pool_classes": data.num_classes})


def dino_objective(config, vit_config: vit.ViTConfig, replicated) -> Objective:
  """DINO on the images of the pool's classes (`pool_of`); no label is read."""
  from smat import dino

  if "dino" not in config.pretrain:
    raise SmatError("config field pretrain.objective='dino' needs the pretrain.dino fields; "
                    "start from the packaged config pretrain_dino_glyphs")
  dino.check_config(config, vit_config)
  p = config.pretrain
  pool, split = pool_of(config)
  domains = load_domains(pool, config.data_dir or None, seed=config.seed)
  data = ImagePool(domains, split, config.data.image_size, p.batch_size, config.seed)
  optimizer = dino.optimizer_from(config)
  step_fn = jax.jit(
      functools.partial(dino.train_step, optimizer=optimizer, vit_config=vit_config,
                        crops=dino.multicrop_config(config), hyper=dino.hyper(config)),
      out_shardings=(replicated, replicated), donate_argnums=0)
  state = dino.init_state(jax.random.key(config.seed), vit_config, dino.head_config(config),
                          optimizer)
  return Objective(data, state, step_fn, dino.lr_schedule(config),
                   lambda state: state.teacher["backbone"],
                   {"loss": "loss", "teacher_entropy": "H_t"},
                   {"objective": "dino", "pool": pool, "pool_split": split,
                    "pool_images": len(data)})


def pretrain(config, workdir: str, stop_after: int | None = None, progress: bool = True) -> dict:
  """Train (or resume) to `config.pretrain.steps`; export the backbone; report few-shot accuracy.

  `stop_after` ends this invocation after that many total steps (as a crash would) — the next
  call resumes from the latest checkpoint.
  """
  from smat import runs

  runs.prepare_workdir(workdir)  # a file or read-only workdir fails before any work
  p = config.pretrain
  objective = p.get("objective", "supervised")
  if objective not in OBJECTIVES:
    raise SmatError(f"config field pretrain.objective={objective!r}: expected one of "
                    f"{', '.join(OBJECTIVES)}")
  vit_config = backbone_config(config)
  mesh = training.data_mesh()
  training.check_divisible(p.batch_size, "pretrain.batch_size", mesh)
  replicated, sharded = training.shardings(mesh)
  make = supervised_objective if objective == "supervised" else dino_objective
  run = make(config, vit_config, replicated)
  step_fn, data = run.step_fn, run.data

  state = training.replicate(run.state, replicated)
  manager = training.checkpoint_manager(os.path.join(workdir, "checkpoints"),
                                        p.keep_checkpoints)
  state = _restore(manager, state)
  start = int(state.step)
  end = p.steps if stop_after is None else min(stop_after, p.steps)
  key = jax.random.key(config.seed + 1)

  def scalars(metrics, state, done):
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(map(math.isfinite, metrics.values())):
      raise SmatError(f"non-finite loss or gradient at step {done} ({metrics}); the last good "
                      f"checkpoint is step {manager.latest_step()} in {workdir}/checkpoints. "
                      f"Lower pretrain.lr or raise pretrain.warmup_steps and run again.")
    return {**metrics, "lr": float(run.lr(done))}

  saves = lambda done: done % p.checkpoint_every == 0 or done == end
  hooks = training.Hooks(
      step=lambda state, batch: step_fn(state, *training.local_slice(batch, sharded,
                                                                     p.batch_size), key),
      scalars=scalars, log_at=lambda done: done % p.log_every == 0 or saves(done),
      checkpoint_at=saves, checkpoint=lambda state, done, write: _save(manager, state),
      postfix=lambda m: {short: f"{m[name]:.3f}" for name, short in run.postfix.items()},
      rate=("images_per_s", p.batch_size), finish=manager.wait_until_finished)
  batches = grain.MapDataset.range(start, end).map(data.batch).to_iter_dataset(
      grain.ReadOptions(num_threads=config.data.loader_threads,
                        prefetch_buffer_size=config.data.prefetch))
  state = training.train_loop(state, batches, start, end, p.steps, hooks, workdir,
                              f"pretrain ({objective})", progress)
  if int(state.step) < p.steps:
    return {"stopped_at": int(state.step)}
  return finish(config, workdir, run.backbone(state), vit_config, progress, **run.provenance)


def finish(config, workdir: str, params, vit_config: vit.ViTConfig, progress: bool,
           **provenance) -> dict:
  """Export `<workdir>/backbone` and write the zero-shot report `<workdir>/fewshot.json`."""
  checkpoint.save(os.path.join(workdir, "backbone"), params, vit_config.replace(dtype="float32"),
                  source="smat pretrain", train=config.data.train, steps=config.pretrain.steps,
                  **provenance)
  e = config.eval
  groups = {spec: load_domains(spec, config.data_dir or None, seed=config.seed)
            for spec in e.domains.split(",")}
  start = time.perf_counter()
  protocols = evaluate.fixed_protocols(config.data.image_size, e.ways, tuple(e.shots),
                                       e.queries, episodes=e.episodes, seed=config.seed)
  report = evaluate.report((params, vit_config), groups, protocols, progress=progress)
  result = {"report": report, "table": evaluate.report_table(report),
            "protocols": {k: p.describe() for k, p in protocols.items()},
            "eval_seconds": time.perf_counter() - start,
            "software": evaluate.software_versions()}
  with open(os.path.join(workdir, "fewshot.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
