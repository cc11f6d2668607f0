"""Backbones: the ViT family, weight import and backbone checkpoints."""
