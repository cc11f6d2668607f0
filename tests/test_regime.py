"""The regime check's arithmetic: its grid, the ID average of paired differences, the choice."""

import math

import pytest

from experiments import regime


def test_grid_is_every_combination_and_names_are_paths():
  points = regime.grid(["optim.delta_lr=1e-3,1e-2", "augment.crop_scale=(0.6,1.0);(0.08,1.0)"])
  assert points == [{"optim.delta_lr": a, "augment.crop_scale": b}
                    for a in ("1e-3", "1e-2") for b in ("(0.6,1.0)", "(0.08,1.0)")]
  assert regime.point_name(points[1]) == "delta_lr1e-3_crop_scale0.08-1.0"
  assert regime.grid([]) == [{}] and regime.point_name({}) == "default"
  with pytest.raises(SystemExit, match="give FIELD=V1,V2"):
    regime.grid(["optim.delta_lr"])


def test_id_average_is_the_mean_with_the_ci_of_a_mean_of_independent_estimates():
  gain = {"a": {"5w1s": (6.0, 0.8), "5w5s": (4.0, 0.6)},
          "b": {"5w1s": (-1.0, 0.6), "5w5s": (1.0, 0.8)}}
  average = regime.id_average(gain)
  assert average["5w1s"] == pytest.approx((2.5, math.sqrt(0.64 + 0.36) / 2))
  assert average["5w5s"] == pytest.approx((2.5, 0.5))
  assert regime.holds(gain, 1.9) and not regime.holds(gain, 2.0)  # 2.5 − 0.5 = 2.0 is not above


def test_choose_takes_the_largest_id_average_gain_and_the_first_of_a_tie():
  point = lambda name, m: {"name": name, "gain": {"a": {"5w1s": (m, 0.1)}}}
  assert regime.choose([point("x", 1.0), point("y", 3.0), point("z", 2.0)])["name"] == "y"
  assert regime.choose([point("x", 2.0), point("y", 2.0)])["name"] == "x"
