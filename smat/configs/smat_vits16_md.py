"""SMAT with DINO ViT-S/16 on Meta-Dataset at 128 px: the paper's main run (GPU, data present).

  smat import-backbone --format timm --weights vit_small_patch16_224.dino.safetensors \
      --arch vit_s16 --out runs/dino_vits16
  smat meta-train --config smat_vits16_md --workdir runs/smat_vits16_md \
      --config.backbone.dtype=bfloat16

25 epochs × 2000 Meta-Dataset episodes from the 8 training sources (TFDS `meta_dataset/*`
builders under $TFDS_DATA_DIR), 4 tasks per update, M = 8, τ = 0.9; all constants as in
../smat.md. Paper (ID avg 8 MD sources / OOD avg 10 domains): SMAT 85.14 / 67.27 zero-shot.
Variants: `:smoke`, `:fullnoise` (training gates with u ~ U(0, 1) instead of the authors' 0.5 ± 1e-6).
"""

from smat.meta import defaults


def get_config(arg=None):
  c = defaults.base("smat")
  c.backbone.path = "runs/dino_vits16"
  return defaults.apply_variants(c, arg)
