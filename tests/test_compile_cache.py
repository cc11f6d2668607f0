"""The persistent compilation cache: one folder per machine, off on request, a second process
reuses what the first compiled, and an unwritable folder is a warning, not a failure."""

import json
import os
import subprocess
import sys

import pytest

from smat import compile_cache

CPUINFO = ("processor\t: 0\nmodel name\t: Example CPU 3000\nflags\t\t: fpu sse2 avx2\n"
           "processor\t: 1\nmodel name\t: Example CPU 3000\nflags\t\t: fpu sse2 avx2\n")
THREADS = {"smat_threads": None, "nproc": None, "usable_cores": 2}


def test_machine_key_names_the_instruction_set_and_the_thread_count():
  key = compile_cache.machine_key(CPUINFO, THREADS)
  assert key == compile_cache.machine_key(CPUINFO, dict(THREADS))
  assert key.startswith("cpu-") and len(key) == 4 + 16
  without_avx2 = CPUINFO.replace(" avx2", "")
  assert compile_cache.machine_key(without_avx2, THREADS) != key
  assert compile_cache.machine_key(CPUINFO.replace("3000", "4000"), THREADS) != key
  assert compile_cache.machine_key(CPUINFO, {**THREADS, "usable_cores": 16}) != key
  assert compile_cache.machine_key(CPUINFO, {**THREADS, "smat_threads": "1", "nproc": "1"}) != key
  # One line per processor, same content: the core listing order does not matter.
  assert compile_cache.machine_key(CPUINFO + CPUINFO, THREADS) == key


def test_cache_dir_default_override_and_off(tmp_path):
  key = compile_cache.machine_key()
  assert compile_cache.cache_dir(str(tmp_path), environ={}) == str(tmp_path / "xla_cache" / key)
  assert compile_cache.cache_dir("x", environ={"SMAT_COMPILE_CACHE": str(tmp_path / "c")}) == \
      str(tmp_path / "c" / key)
  for off in ("off", "0", "OFF", "false"):
    assert compile_cache.cache_dir(str(tmp_path), environ={"SMAT_COMPILE_CACHE": off}) is None
    assert compile_cache.enable(str(tmp_path), environ={"SMAT_COMPILE_CACHE": off}) is None


def test_unwritable_cache_folder_warns_and_runs_on(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.warns(UserWarning, match="compilation cache off: cannot make"):
    assert compile_cache.enable(environ={"SMAT_COMPILE_CACHE": str(blocker / "sub")}) is None


PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from smat import compile_cache
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = compile_cache.enable(min_compile_secs=0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"path": path,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def test_a_second_process_reuses_the_first_ones_compiled_program(tmp_path):
  env = {**os.environ, "SMAT_COMPILE_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
  runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1])
          for _ in range(2)]
  first, second = runs
  assert first["path"] == second["path"]
  assert first["path"].startswith(str(tmp_path / "cache"))
  assert first["hits"] == 0 and first["misses"] >= 1
  assert os.listdir(first["path"])  # the entry was written
  assert second["hits"] >= 1 and second["misses"] == 0
