"""smat.host_memory: freed blocks stay in the process, so the next XLA step reuses mapped pages."""

import platform
import os
import subprocess
import sys

import pytest

from smat import host_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")

# Allocates and frees 64 MB with malloc, then reports glibc's counters: with the policy, the block
# comes from the heap (arena grows, no mmapped bytes) and stays there after free (no trim).
_PROBE = """
import ctypes
import smat
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20)
held = libc.mallinfo2()
libc.free(ctypes.c_void_p(p))
after = libc.mallinfo2()
from smat import host_memory
print(held.hblkhd >> 20, held.arena >> 20, after.arena >> 20, host_memory.describe())
"""


def _probe(policy: str) -> tuple[list[int], str]:
  """(MB mmapped while held, MB of heap while held, MB of heap after free), the policy named."""
  out = subprocess.run([sys.executable, "-c", _PROBE], check=True, timeout=60, text=True,
                       capture_output=True, env={"SMAT_MALLOC": policy, "PATH": ""}).stdout
  *sizes, described = out.split()
  return [int(v) for v in sizes], described


@glibc
def test_retain_serves_large_blocks_from_the_heap_and_keeps_them():
  (mmapped, arena_held, arena_after), described = _probe("retain")
  assert mmapped < 64 and arena_held >= 64 and arena_after >= 64 and described == "retain"


@glibc
def test_system_leaves_glibc_defaults():
  (mmapped, _, arena_after), described = _probe("system")
  assert mmapped >= 64 and arena_after < 64 and described == "system"


def test_choice_rejects_nonsense():
  assert host_memory.choice({}) == "system"
  assert host_memory.choice({"SMAT_MALLOC": "retain"}) == "retain"
  assert host_memory.choice({"SMAT_MALLOC": "system"}) == "system"
  with pytest.raises(ValueError, match="SMAT_MALLOC"):
    host_memory.choice({"SMAT_MALLOC": "jemalloc"})
  assert not host_memory.retain_freed_memory({"SMAT_MALLOC": "system"})
  assert not host_memory.retain_freed_memory({})


@pytest.mark.parametrize("name,value", [("SMAT_MALLOC", "jemalloc"), ("SMAT_THREADS", "two")])
def test_a_bad_variable_stops_the_import_with_one_error_line(name, value):
  env = {k: v for k, v in os.environ.items() if k not in ("SMAT_MALLOC", "SMAT_THREADS")}
  done = subprocess.run([sys.executable, "-c", "import smat"], timeout=60, text=True,
                        capture_output=True, env={**env, name: value})
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 1 and len(lines) == 1, done.stderr
  assert lines[0].startswith(f"error: {name}={value!r}") and "unset it" in lines[0]
