"""Sparse interpolated experts and the meta-training step (gates, router, budget, task losses)."""
