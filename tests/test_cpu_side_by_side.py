"""The smat_step workload's JSON spec (benchmarks.cpu_side_by_side.smat_step_spec): what the
PyTorch side (benchmarks/torch_smat_step.py, run elsewhere, never imported here) is told to run
must be what smat's own step runs for the config. Needs no torch."""

import json

import pytest

from benchmarks import cpu_side_by_side
from smat import config as config_lib
from smat.errors import SmatError
from smat.meta import gates, router


def test_smat_step_spec_follows_the_config():
  config = config_lib.load("smat_glyphs")
  spec = cpu_side_by_side.smat_step_spec(config, "vit_mini_p4", threads=2, repeats=3)
  assert json.loads(json.dumps(spec)) == spec  # one JSON argument, nothing lost
  assert spec["backbone"] == {"arch": "vit_mini_p4", "image_size": 32, "patch": 4, "width": 128,
                              "depth": 4, "heads": 4, "mlp": 512, "layer_norm_eps": 1e-6,
                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
  assert spec["episode"] == {"tasks": 4, "ways": 5, "support": 25, "query": 25}
  e = spec["experts"]
  assert (e["num_experts"], e["target_sparsity"], e["gate_noise"]) == (4, 0.9, 1e-6)
  assert (e["beta"], e["zeta"], e["gamma"], e["gate_init_std"]) == (
      gates.BETA, gates.ZETA, gates.GAMMA, 0.5)
  assert spec["loss"] == {"inner_lr": 1e-3, "teacher_lr": 5e-3, "kd_temperature": 2.0,
                          "kd_direction": "reverse", "ce_weight": 0.75, "kd_weight": 0.25,
                          "router_logit_weight": 1e-4, "cosine_scale": 10.0}
  assert spec["router"]["skills"] == router.NUM_SKILLS
  assert spec["router"]["temperature_decay_tasks"] == 180.0
  o = spec["optim"]
  assert (o["delta_lr"], o["gate_lr"], o["lambda_lr"], o["router_lr"]) == (0.01, 1e6, 0.1, 1e-4)
  assert (o["warmup_epochs"], o["cosine_epochs"], o["steps_per_epoch"]) == (4, 40, 10)
  assert spec["augment"]["flip_prob"] == 0.0 and spec["augment"]["crop_scale"] == [0.08, 1.0]
  assert (spec["threads"], spec["repeats"], spec["warmup"]) == (2, 3, 3)


@pytest.mark.parametrize("config_name, overrides", [
    ("pmf_glyphs", ()), ("smat_glyphs", ("experts.structured=True",)),
    ("smat_glyphs", ("optim.schedule=step",))])
def test_smat_step_spec_refuses_what_the_torch_step_does_not_implement(config_name, overrides):
  config = config_lib.load(config_name, overrides)
  with pytest.raises(SmatError, match="PyTorch side"):
    cpu_side_by_side.smat_step_spec(config, "vit_mini_p4", threads=2, repeats=1)
