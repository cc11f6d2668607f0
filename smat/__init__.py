"""Sparse MetA-Tuning (SMAT) in JAX."""

import sys as _sys

from smat import host_memory as _host_memory
from smat import threads as _threads

__version__ = "0.1.0"

try:
  # Before anything starts JAX's CPU backend, which fixes its thread pool once (see smat.threads).
  _threads.pin_from_env()
  # Before XLA allocates its first buffers (SMAT_MALLOC=retain; see smat.host_memory).
  _host_memory.retain_freed_memory()
except ValueError as _e:  # a bad SMAT_* variable: one line naming it and the fix, no traceback
  _sys.exit(f"error: {_e}")
