"""SMAT_THREADS pins XLA's CPU thread pool: the same bits on 1 core as on all cores.

Unpinned, the weight gradients of `vit_mini_p4` on 64 images differ in the last bits between a
process limited to 1 core and one on 2 (smat/threads.py); pinned, they are identical.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from smat import threads

# Features and a gradient of a frozen-init vit_mini_p4 on 64 seeded images, saved to argv[1].
_PROBE = """
import sys
import smat
import jax, jax.numpy as jnp, numpy as np
from smat.models import vit
cfg = vit.get_config("vit_mini_p4")
params = vit.init(cfg, jax.random.key(0))
images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
x = vit.preprocess(jnp.asarray(images), cfg)
r = jax.random.normal(jax.random.key(1), (64, cfg.width))
loss = lambda p: jnp.sum(jnp.tanh(vit.forward(p, x, cfg)) * r)
out = {"features": jax.jit(lambda p: vit.forward(p, x, cfg))(params)}
grads = jax.jit(jax.grad(loss))(params)
out.update({jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]})
np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in out.items()})
"""


def test_pin_from_env_sets_nproc_and_rejects_nonsense():
  env = {}
  assert threads.pin_from_env(env) is None and "NPROC" not in env
  env = {"SMAT_THREADS": "2"}
  assert threads.pin_from_env(env) == 2 and env["NPROC"] == "2"
  for bad in ("0", "two", "-1"):
    with pytest.raises(ValueError, match="SMAT_THREADS"):
      threads.pin_from_env({"SMAT_THREADS": bad})
  described = threads.describe({"SMAT_THREADS": "2", "NPROC": "2"})
  assert described["smat_threads"] == "2" and described["usable_cores"] >= 1


def test_pinning_after_jax_started_warns():
  script = ("import os, warnings, jax; jax.devices(); os.environ['SMAT_THREADS'] = '2'\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "  warnings.simplefilter('always'); import smat\n"
            "print([str(w.message) for w in caught])")
  env = {**{k: v for k, v in os.environ.items() if k != "NPROC"}, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60,
                       capture_output=True, text=True).stdout
  assert "comes too late" in out


def _probe(path, cores, env):
  """Run the probe limited to `cores` (a set of CPU ids) with `env` added; its saved arrays."""
  env = {**{k: v for k, v in os.environ.items() if k not in ("NPROC", "XLA_FLAGS")}, **env,
         "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", _PROBE, str(path)], env=env, check=True, timeout=120,
                 preexec_fn=lambda: os.sched_setaffinity(0, cores))
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_pinned_threads_give_identical_bits_on_one_core_and_on_all(tmp_path):
  all_cores = os.sched_getaffinity(0)
  pinned = {"SMAT_THREADS": "2"}
  one = _probe(tmp_path / "one.npz", {min(all_cores)}, pinned)
  every = _probe(tmp_path / "all.npz", all_cores, pinned)
  assert one.keys() == every.keys() and len(one) > 20
  differ = [k for k in one if one[k].tobytes() != every[k].tobytes()]
  assert not differ, f"{len(differ)} arrays differ between 1 and {len(all_cores)} cores: {differ[:3]}"
