"""Pin the size of XLA's CPU intra-op thread pool, so results do not depend on the core count.

XLA's CPU client splits large dots across its intra-op pool, whose size is the number of cores
the process may use (`taskset` counts). Split differently, a dot sums in another order: on
`vit_mini_p4` the weight gradients of 64 images differ in the last bits (≈ 4e-7 relative)
between 1 and 2 threads, and training amplifies that into different weights. XLA reads the
pool size from `$NPROC` when set; `SMAT_THREADS=N` sets it before JAX starts its CPU backend,
so every machine that pins the same N computes the same bits (same ISA and versions).
`--xla_cpu_multi_thread_eigen=false` does not do this: the split stays.
"""

from __future__ import annotations

import os
import sys
import warnings

ENV = "SMAT_THREADS"


def pin_from_env(environ=os.environ) -> int | None:
  """Copy $SMAT_THREADS into $NPROC (what XLA reads); the pinned count, or None if unset."""
  value = environ.get(ENV, "").strip()
  if not value:
    return None
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"{ENV}={value!r}: expected a positive thread count; set it to one "
                     f"(e.g. {ENV}=2) or unset it to use every core")
  if _backend_started() and environ.get("NPROC") != value:
    warnings.warn(f"{ENV}={value} comes too late: JAX's CPU backend already started with its "
                  f"own thread count; import smat before running anything in JAX", stacklevel=2)
  environ["NPROC"] = value
  return int(value)


def _backend_started() -> bool:
  """Whether JAX already made its backends (their thread pools are fixed from then on)."""
  bridge = sys.modules.get("jax._src.xla_bridge")
  return bool(bridge and bridge.backends_are_initialized())


def describe(environ=os.environ) -> dict:
  """What decides XLA's CPU arithmetic besides versions: recorded next to every result."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"smat_threads": environ.get(ENV) or None, "nproc": environ.get("NPROC") or None,
          "usable_cores": cores, "xla_flags": environ.get("XLA_FLAGS") or None}
