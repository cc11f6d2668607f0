"""The specialisation measures against closed forms."""

import numpy as np
import pytest

from smat import specialisation


def test_routing_information_closed_forms():
  own = specialisation.routing_information({"a": np.array([1.0, 0, 0, 0]),
                                             "b": np.array([0, 1.0, 0, 0])})
  assert own["nats"] == pytest.approx(np.log(2)) and own["normalised"] == pytest.approx(1.0)
  alike = specialisation.routing_information({"a": np.full(4, 0.25), "b": np.full(4, 0.25),
                                               "c": np.full(4, 0.25)})
  assert alike["nats"] == pytest.approx(0.0, abs=1e-12) and alike["bound_nats"] == pytest.approx(
      np.log(3))
  # H(½, ½) − H(¾, ¼), and α given unnormalised is normalised first.
  mixed = specialisation.routing_information({"a": np.array([3.0, 1.0]),
                                               "b": np.array([0.25, 0.75])})
  h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  assert mixed["nats"] == pytest.approx(np.log(2) - h)
  assert mixed["normalised"] == pytest.approx((np.log(2) - h) / np.log(2))


def test_mask_overlap_counts_backbone_elements_and_compares_with_chance():
  # One gated kernel [3, 4] with a gate per column (each covers 3 entries), one ungated leaf
  # of 12 entries: 24 backbone elements. Expert 0 keeps columns 0, 1; expert 1 keeps 1, 2.
  theta_pre = {"gated": np.zeros((3, 4)), "plain": np.zeros(12)}
  masks = {"gated": np.array([[1.0, 1, 0, 0], [0, 1, 1, 0]]), "plain": np.zeros((0,))}
  out = specialisation.mask_overlap(masks, theta_pre)
  np.testing.assert_allclose(out["density"], [6 / 24, 6 / 24])
  np.testing.assert_allclose(out["jaccard"], [[1.0, 1 / 3], [1 / 3, 1.0]])
  rho = 0.25
  assert out["mean_chance"] == pytest.approx(rho * rho / (2 * rho - rho * rho))
  assert out["mean_jaccard"] == pytest.approx(1 / 3)
  # Masks a real run would not have: an empty expert overlaps nothing.
  empty = specialisation.mask_overlap({"gated": np.array([[1.0, 1, 0, 0], [0, 0, 0, 0]]),
                                       "plain": np.zeros((0,))}, theta_pre)
  assert empty["jaccard"][0][1] == 0.0 and empty["chance"][0][1] == 0.0
