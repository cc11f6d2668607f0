"""Sparse MetA-Tuning (SMAT) in JAX."""

from smat import host_memory as _host_memory
from smat import threads as _threads

__version__ = "0.1.0"

# Before anything starts JAX's CPU backend, which fixes its thread pool once (see smat.threads).
_threads.pin_from_env()
# Before XLA allocates its first buffers (see smat.host_memory).
_host_memory.retain_freed_memory()
