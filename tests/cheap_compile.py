"""XLA's cheapest CPU compile options, for tests dominated by compile time rather than run time:
those the installed jaxlib knows (an older XLA lacks some; they are left out rather than failing
every compile)."""

import functools

import jax
import jax.numpy as jnp

WANTED = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
          "xla_cpu_use_fusion_emitters": False}


@functools.cache
def options() -> dict:
  known = {}
  for name, value in WANTED.items():
    try:
      jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options={name: value})
    except Exception as e:  # XlaRuntimeError, whose class moved between jaxlib versions
      if "No such compile option" not in str(e):
        raise
      continue
    known[name] = value
  return known
