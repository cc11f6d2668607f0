"""Result files: checked before any work, written atomically after it.

An evaluation can run for hours; a destination that cannot be written (missing folder, read-only,
full, a directory, no extension) must fail before the first episode, not after the last. A result
is written to a temporary file beside the destination and renamed, so a crash or a full disk
never leaves half a file where a result was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

from smat.errors import SmatError

MIN_FREE_BYTES = 1 << 20  # less than this on the destination's disk is "full"


def check_output(path: str, flag: str, suffixes: tuple[str, ...]) -> None:
  """Raise a one-line SmatError unless `path` can take a result file ending in `suffixes`."""
  if os.path.isdir(path):
    raise SmatError(f"{flag} {path}: is a directory; give a file name such as "
                    f"{os.path.join(path, 'results' + suffixes[0])}")
  if not path.lower().endswith(tuple(s.lower() for s in suffixes)):
    raise SmatError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}, e.g. "
                    f"{os.path.splitext(path)[0] or 'out'}{suffixes[0]}")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise SmatError(f"{flag} {path}: directory {parent} does not exist; create it first")
  try:  # a real write: os.access is not enough (root ignores modes; read-only mounts)
    with tempfile.NamedTemporaryFile(dir=parent, prefix=".smat-probe-"):
      pass
  except OSError as e:
    raise SmatError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); pick another "
                    f"path") from None
  if free_bytes(parent) < MIN_FREE_BYTES:
    raise SmatError(f"{flag} {path}: the disk holding {parent} is full; free space or pick "
                    f"another path")


def free_bytes(directory: str) -> int:
  return shutil.disk_usage(directory).free


def write_atomic(path: str, write: Callable, mode: str = "w") -> None:
  """`write(f)` into a temporary file beside `path`, then rename it onto `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _remove(tmp)
    raise SmatError(f"{path}: writing the result failed ({e.strerror or e}); nothing was "
                    f"written there") from None
  except BaseException:
    _remove(tmp)
    raise


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
