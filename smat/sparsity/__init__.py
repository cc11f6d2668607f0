"""Sparsity strategies: hand-designed or searched masks over δ, interchangeable with SMAT's
learned gates (inside meta-training) and with sparse fine-tuning (at meta-test).

  random     uniform masks at the budget (the floor)                    random_mask.py
  map        magnitude attention, cubic schedule, explore → exploit     magnitude.py
  influence  PLATON: windowed |δ ⊙ g|, importance × uncertainty          influence.py
  selfpruner per-block budgets (searched by evolution.py), top |δ| inside  budgeted.py
  circuit    edge attribution patching, endpoint slices of the top edges  circuit.py

The shared contract (init / update / mask, exact budgets, the cubic schedule) is in common.py;
structured pruning of heads and MLP channels (Self-Pruner's backbone compression) in compress.py.
"""

from __future__ import annotations

from smat.sparsity.budgeted import SelfPruner
from smat.sparsity.circuit import Circuit
from smat.sparsity.common import cubic, kept_count, top_k_mask
from smat.sparsity.influence import Influence
from smat.sparsity.magnitude import MAP
from smat.sparsity.random_mask import Random

STRATEGIES = {"random": Random, "map": MAP, "influence": Influence, "selfpruner": SelfPruner,
              "circuit": Circuit}


def make(name: str, **fields):
  """The strategy `name` with its dataclass fields (unknown names or fields raise)."""
  if name not in STRATEGIES:
    raise ValueError(f"unknown sparsity strategy {name!r}; choose from {sorted(STRATEGIES)}")
  return STRATEGIES[name](**fields)


__all__ = ["Circuit", "Influence", "MAP", "Random", "STRATEGIES", "SelfPruner", "cubic",
           "kept_count", "make", "top_k_mask"]
