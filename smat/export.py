"""A model out of smat as one safetensors file in timm's ViT layout (or Hugging Face's), so that
timm's `VisionTransformer(num_classes=0)` loads it strictly, without smat (`smat export`).

What a file holds, by what it is made from:
* a backbone directory: θ_pre itself (pre-trained or imported);
* a PMF run: its one dense backbone θ_pre + δ;
* a SMAT or SoftMerge run and a support set (a folder with one sub-folder of images per class):
  θ_task for that task, routed and masked exactly as zero-shot meta-test does (α from the
  support's θ_pre prototypes, deterministic gates); the support images are resized and
  centre-cropped as evaluation images are (`data.test_resize_ratio`);
* a SMAT or SoftMerge run and expert weights α (`uniform`, or M numbers): the merged model
  θ_pre + (Σ_k α_k z_k) ⊙ δ (SoftMerge: θ_pre + Σ_k α_k δ_k) at those weights.
The file's metadata names the source, the checkpoint, the architecture and, for θ_task, α.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from smat.data.episodes import Episode
from smat.errors import DataError, SmatError
from smat.models import vit


def support_episode(folder: str, image_size: int, resize_ratio: float,
                    skip_corrupt: bool = False) -> Episode:
  """Every image of each class of the `folder:` domain FOLDER as the support set of one task,
  resized as evaluation images are (the query set is one masked-out placeholder: routing reads
  the support only); unreadable images fail, or with `skip_corrupt` are left out (counted)."""
  from smat.data import episodes as ep
  from smat.data.sources import folder as folder_source

  domain = folder_source.load(folder, skip_corrupt=skip_corrupt)
  classes = domain.classes("test")
  if len(classes) < 2:
    raise DataError(f"--support {folder}: needs at least 2 class sub-folders (found "
                    f"{len(classes)})")
  ids = [(label, int(i)) for label, c in enumerate(classes) for i in c.image_ids]
  images = [ep.resize(domain.read(i), image_size, resize_ratio) for _, i in ids]
  count = len(ids)
  return Episode(np.stack(images), np.asarray([label for label, _ in ids], np.int32),
                 np.ones(count, bool), np.zeros((1, image_size, image_size, 3), np.uint8),
                 np.zeros(1, np.int32), np.zeros(1, bool), np.ones(len(classes), bool),
                 np.zeros((), np.int32))


def parse_alpha(text: str, num_experts: int) -> np.ndarray:
  """`uniform` or M comma-separated non-negative weights (normalised to sum 1)."""
  if text.strip() == "uniform":
    return np.full(num_experts, 1.0 / num_experts, np.float32)
  try:
    alpha = np.asarray([float(x) for x in text.split(",")], np.float32)
  except ValueError:
    alpha = np.asarray([], np.float32)
  if alpha.shape != (num_experts,) or not np.all(alpha >= 0) or not alpha.sum() > 0:
    raise SmatError(f"--alpha {text}: give `uniform` or {num_experts} non-negative weights, "
                    f"comma-separated, not all 0 (the run has {num_experts} experts)")
  return alpha / alpha.sum()


def merged_params(run, alpha) -> dict:
  """θ of a SMAT / SoftMerge run at expert weights α [M]: the meta-test θ_task of any task that
  the router gives α."""
  from smat.meta import experts

  alpha = jnp.asarray(alpha, jnp.float32)
  if run.hp.method == "softmerge":
    return experts.soft_merge(run.theta_pre, run.params["delta"], alpha)
  masks = (run.params["masks"] if "masks" in run.params
           else experts.eval_masks(run.params["gates"]))
  return experts.interpolate(run.theta_pre, run.params["delta"], experts.merge(alpha, masks))


def task_params(run, episode: Episode) -> tuple[dict, np.ndarray]:
  """(θ_task, α) of a SMAT / SoftMerge run for one support set, as zero-shot meta-test builds
  them."""
  from smat.meta import methods, router

  router_params = router.spectral_normalize(run.params["router"], run.router_state)
  theta, alpha = jax.jit(methods.zero_shot_params, static_argnames="hp")(
      run.params, run.theta_pre, router_params, jax.tree.map(jnp.asarray, episode),
      hp=run.hp, temp=run.temperature)
  return theta, np.asarray(alpha)


def from_run(workdir: str, which: str = "best", support: str | None = None,
             alpha: str | None = None, skip_corrupt: bool = False
             ) -> tuple[dict, vit.ViTConfig, dict]:
  """(parameters, architecture, metadata) of what a meta-training run exports."""
  from smat import config as config_lib
  from smat import metatrain

  run = metatrain.load_run(workdir, which)
  method = run.hp.method
  meta = {"source": os.path.abspath(workdir), "checkpoint": which, "method": method,
          "tasks_seen": run.tasks_seen}
  if method == "pmf":
    if support or alpha:
      raise SmatError(f"{workdir}: a PMF run has one backbone for every task; drop "
                      f"{'--support' if support else '--alpha'}")
    return run.dense_params(), run.hp.vit, {**meta, "model": "θ_pre + δ"}
  if bool(support) == bool(alpha):
    raise SmatError(f"{workdir}: a {method} run builds θ_task per task; give --support DIR "
                    f"(θ_task of that support set) or --alpha uniform|w1,...,wM (the merged "
                    f"model at those expert weights), one of them")
  if support:
    config = config_lib.from_json(os.path.join(workdir, "config.json"))
    episode = support_episode(support, config.data.image_size,
                              config.data.get("test_resize_ratio") or 1.0, skip_corrupt)
    theta, weights = task_params(run, episode)
    return theta, run.hp.vit, {**meta, "model": "θ_task", "support": os.path.abspath(support),
                               "alpha": weights.tolist()}
  weights = parse_alpha(alpha, run.hp.experts.num_experts)
  return merged_params(run, weights), run.hp.vit, {**meta, "model": "merged",
                                                   "alpha": weights.tolist()}


def from_backbone(path: str) -> tuple[dict, vit.ViTConfig, dict]:
  from smat.models import checkpoint

  params, config = checkpoint.load(path)
  return params, config, {"source": os.path.abspath(path), "model": "θ_pre"}


def save(path: str, params: dict, config: vit.ViTConfig, meta: dict, fmt: str = "timm") -> None:
  """The parameters as a `fmt`-layout safetensors file, written atomically; the metadata (all
  strings, as safetensors requires) adds the architecture so the file re-imports as it was."""
  from safetensors.numpy import save as to_bytes

  from smat import __version__, outputs
  from smat.models import convert

  tensors = convert.export(jax.device_get(params), fmt)
  header = {"format": "pt", "smat_version": __version__, "layout": fmt,
            "architecture": json.dumps(dataclasses.asdict(config), default=str),
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}}
  outputs.write_atomic(path, lambda f: f.write(to_bytes(tensors, metadata=header)), "wb")
