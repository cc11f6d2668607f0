"""SMAT with DINO ViT-B/16 on Meta-Dataset at 128 px (GPU, data present).

  smat import-backbone --format timm --weights vit_base_patch16_224.dino.safetensors \
      --arch vit_b16 --out runs/dino_vitb16
  smat meta-train --config smat_vitb16_md --workdir runs/smat_vitb16_md

smat_vits16_md with the paper's ViT-B values: τ = 0.95, δ lr 5e-4, 50 epochs;
bf16 compute, rematerialised blocks and one task at a time per device (`train.tasks_at_once`,
the same update) by default, so Meta-Dataset's largest episodes fit in memory
(benchmarks/results/memory_vit_s16_b16.md).
"""

from smat.config import sibling


def get_config(arg=None):
  c = sibling(__file__, "smat_vits16_md.py", arg)
  c.backbone.path = "runs/dino_vitb16"
  c.backbone.dtype = "bfloat16"
  c.backbone.remat = True
  c.train.tasks_at_once = 1
  c.experts.target_sparsity = 0.95
  c.optim.delta_lr = 5e-4
  if "smoke" not in (arg or ""):
    c.train.epochs = 50
  return c
