"""Sparse MetA-Tuning (SMAT) in JAX."""

__version__ = "0.1.0"
