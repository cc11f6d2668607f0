"""Keep freed host memory in the process, so XLA:CPU does not pay page faults on every step.

XLA:CPU allocates each execution's temporaries and outputs afresh with `malloc`. glibc serves
blocks that large with a new `mmap` and unmaps them on `free`, so every step touches hundreds of
MB of new pages: the kernel faults and zeroes each one before the computation can write it. On a
2-core CPU that is most of an elementwise op's time (`x * 2 + 1` on [13000, 512] floats: 6.8 ms
with glibc's defaults, 1.2 ms here) and a third of a ViT forward+backward
(`benchmarks.cpu_side_by_side`). With mmap off, one arena and no trimming, freed blocks go back
to the heap and the next step reuses pages that are already mapped. Numbers are unchanged: only
where the buffers live changes. The cost: the process keeps its peak heap until it exits.

Applied when smat is imported (glibc only; elsewhere nothing changes). `SMAT_MALLOC=system`
leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "SMAT_MALLOC"
CHOICES = ("retain", "system")

# glibc's mallopt parameters (malloc.h). A trim threshold of -1 is SIZE_MAX to glibc (it takes
# the int as a size_t): never trim. INT_MAX is not enough: the heap of one ViT-mini step on 200
# images passes 2 GB, and trimming above it brought back the page faults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER = -1

_applied = False  # whether glibc took the settings in this process


def choice(environ=os.environ) -> str:
  """$SMAT_MALLOC: 'retain' (the default) or 'system'."""
  value = environ.get(ENV, "").strip() or "retain"
  if value not in CHOICES:
    raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
  return value


def _libc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory(environ=os.environ) -> bool:
  """Ask glibc to serve every block from one heap (no mmap) and never trim it; whether it did
  (False under SMAT_MALLOC=system or without glibc)."""
  global _applied
  libc = _libc()
  if choice(environ) == "system" or libc is None:
    return False
  settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, _NEVER))
  _applied = all(libc.mallopt(param, value) == 1 for param, value in settings) or _applied
  return _applied


def describe() -> str:
  """The allocator policy this process runs under, recorded next to results: 'retain' once
  glibc took the settings, else 'system'."""
  return "retain" if _applied else "system"
