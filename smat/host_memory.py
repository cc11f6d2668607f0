"""Optionally keep freed host memory in the process, so XLA:CPU does not fault in new pages.

XLA:CPU allocates each execution's temporaries and outputs afresh with `malloc`. glibc serves
blocks that large with a new `mmap` and unmaps them on `free`, so every step touches hundreds of
MB of new pages that the kernel faults in and zeroes. `SMAT_MALLOC=retain` turns mmap off, keeps
one arena and never trims, so freed blocks go back to the heap and the next step reuses mapped
pages. Numbers are unchanged: only where the buffers live changes.

It is not the default because it helps a plain ViT forward+backward and hurts the steps smat
runs: on 2 cores, `x * 2 + 1` on [13000, 512] floats takes 1.2 ms against 6.8 and ViT-mini
forward+backward on 200 images 1.28x timm's speed against 0.90x (`benchmarks.cpu_side_by_side`),
but the SMAT glyph step runs at 2.5 tasks/s against 3.2 with glibc's defaults and PMF's at 6.6
against 7.9 (`benchmarks.throughput`), and the process keeps its peak heap until it exits.
The single arena serialises the many small allocations of XLA's thread pool; with more arenas
glibc unmaps their heaps again. Applied when smat is imported (glibc only; elsewhere nothing
changes); unset or `SMAT_MALLOC=system` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "SMAT_MALLOC"
CHOICES = ("system", "retain")

# glibc's mallopt parameters (malloc.h). A trim threshold of -1 is SIZE_MAX to glibc (it takes
# the int as a size_t): never trim. INT_MAX is not enough: the heap of one ViT-mini step on 200
# images passes 2 GB, and trimming above it brought back the page faults.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER = -1

_applied = False  # whether glibc took the settings in this process


def choice(environ=os.environ) -> str:
  """$SMAT_MALLOC: 'system' (the default: glibc's own settings) or 'retain'."""
  value = environ.get(ENV, "").strip() or "system"
  if value not in CHOICES:
    raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}; unset it for "
                     f"glibc's defaults or set {ENV}=retain to keep freed memory")
  return value


def _libc():
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") else None


def retain_freed_memory(environ=os.environ) -> bool:
  """Under SMAT_MALLOC=retain, ask glibc to serve every block from one heap (no mmap) and never
  trim it; whether it did (False by default, under SMAT_MALLOC=system or without glibc)."""
  global _applied
  libc = _libc()
  if choice(environ) != "retain" or libc is None:
    return False
  settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, _NEVER))
  _applied = all(libc.mallopt(param, value) == 1 for param, value in settings) or _applied
  return _applied


def describe() -> str:
  """The allocator policy this process runs under, recorded next to results: 'retain' once
  glibc took the settings, else 'system'."""
  return "retain" if _applied else "system"
