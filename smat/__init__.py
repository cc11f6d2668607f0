"""Sparse MetA-Tuning (SMAT) in JAX."""

from smat import threads as _threads

__version__ = "0.1.0"

# Before anything starts JAX's CPU backend, which fixes its thread pool once (see smat.threads).
_threads.pin_from_env()
