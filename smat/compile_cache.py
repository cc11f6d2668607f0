"""A persistent XLA compilation cache, on by default in the CLI: a second run of the main job, a
resumed run and every evaluation after the first reuse compiled steps instead of compiling them
again (the glyph SMAT step takes over a minute to compile cold on 2 CPU cores).

JAX keys each entry by the program, jaxlib's version, the backend's version, the XLA flags and
the compile options. On the CPU that key does not name the machine: every CPU's device kind is
"cpu", while XLA:CPU compiles for the host's instruction set and plans its parallel tasks for the
size of its thread pool. A cache shared between machines (a home directory on a network disk)
could hand one machine code built for another. So entries live in a folder named by a hash of
the CPU's model and flags and the thread count: machines that differ never share an entry.

`$SMAT_COMPILE_CACHE` names another folder for the cache, or `off` turns it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings

from smat import threads

ENV = "SMAT_COMPILE_CACHE"
OFF = frozenset({"0", "off", "false", "no", "none"})
# An entry is kept only if compiling it took this long: small evaluator and test programs stay
# out, every training step and episode function goes in.
MIN_COMPILE_SECS = 1.0
MAX_BYTES = 4 << 30  # least recently used entries go first past this size


def machine_key(cpuinfo: str | None = None, thread_settings: dict | None = None) -> str:
  """A short hash of what decides XLA:CPU's compiled code on this machine besides JAX's key:
  the processor's model and instruction-set flags, the architecture and the thread count."""
  cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
  wanted = ("model name", "flags", "features", "cpu model", "isa")
  lines = sorted({line.strip() for line in cpuinfo.splitlines()
                  if line.split(":")[0].strip().lower() in wanted})
  settings = threads.describe() if thread_settings is None else thread_settings
  counts = (settings.get("smat_threads"), settings.get("nproc"), settings.get("usable_cores"))
  text = "\n".join([platform.machine(), repr(counts), *lines])
  return "cpu-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(data_dir: str | None = None, environ=os.environ) -> str | None:
  """Where this machine's entries go (`<data dir>/xla_cache/<machine key>` unless
  `$SMAT_COMPILE_CACHE` says otherwise), or None when it is off."""
  value = environ.get(ENV, "").strip()
  if value.lower() in OFF and value:
    return None
  if not value:
    from smat.data.spec import default_data_dir

    value = os.path.join(data_dir or default_data_dir(), "xla_cache")
  return os.path.join(os.path.abspath(os.path.expanduser(value)), machine_key())


def enable(data_dir: str | None = None, min_compile_secs: float = MIN_COMPILE_SECS,
           environ=os.environ) -> str | None:
  """Turn JAX's persistent cache on in this machine's folder; the folder, or None when it is off
  or cannot be made (a cache is an optimisation: a read-only home must not stop a run)."""
  path = cache_dir(data_dir, environ)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    warnings.warn(f"compilation cache off: cannot make {path} ({e.strerror or e}); set "
                  f"{ENV} to a writable folder, or {ENV}=off", stacklevel=2)
    return None
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  compilation_cache.reset_cache()  # the next compile opens the folder set here
  return path


def _read_cpuinfo() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return f.read()
  except OSError:
    return platform.processor()
