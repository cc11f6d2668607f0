"""Figures of a run: the densities behind mask_density.png against hand counts; files written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smat import plots
from smat.meta import experts, gates
from smat.models import vit

CFG = vit.ViTConfig(patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16, image_size=8)


def _gates(theta, structured=False):
  """Expert 0 keeps every query entry of block 1; expert 1 keeps the first half of each fc1
  kernel's input rows in both blocks; every other gate is closed."""
  log_alpha = experts.init_gates(jax.random.key(0), theta, 2, structured)
  closed = jax.tree.map(lambda g: jnp.full_like(g, -4.0), log_alpha)
  query = closed["blocks"]["attn"]["query"]
  closed["blocks"]["attn"]["query"] = {k: v.at[0, 1].set(4.0) for k, v in query.items()}
  half = CFG.width // 2
  kernel = closed["blocks"]["fc1"]["kernel"]
  closed["blocks"]["fc1"]["kernel"] = kernel.at[1, :, :half].set(4.0)
  return closed


@pytest.mark.parametrize("structured", [False, True])
def test_density_by_layer_counts_kept_entries_per_block_and_type(structured):
  theta = vit.init(CFG, jax.random.key(1))
  density = plots.density_by_layer(_gates(theta, structured), theta)
  assert density["attn/query"].shape == (2, CFG.depth)
  np.testing.assert_allclose(density["attn/query"], [[0, 1], [0, 0]])
  # fc1 = kernel [8, 16] + bias [16] per block; half the kernel rows kept by expert 1.
  kept = (CFG.width // 2) * CFG.mlp_dim / (CFG.width * CFG.mlp_dim + CFG.mlp_dim)
  np.testing.assert_allclose(density["fc1"], [[0, 0], [kept, kept]], rtol=1e-6)
  for kind in ("attn/key", "attn/value", "attn/proj", "fc2", "norm1", "norm2", "embeddings",
               "final norm"):
    assert np.all(density[kind] == 0), kind
  # Per block over every entry of the block: block 1 holds expert 0's query entries.
  sizes = plots.block_entries(theta)
  summary = plots.density_summary(density, theta)
  query = CFG.width * CFG.width + CFG.width
  expected_block1 = (0.5 * query + 0.5 * kept * sizes["fc1"]) / sum(sizes.values())
  assert summary["by_block"][1] == pytest.approx(expected_block1, rel=1e-6)


def test_expected_density_is_the_mean_probability_of_a_nonzero_sample():
  theta = vit.init(CFG, jax.random.key(1))
  log_alpha = jax.tree.map(lambda g: jnp.full_like(g, 0.3), experts.init_gates(
      jax.random.key(0), theta, 2))
  density = plots.density_by_layer(log_alpha, theta, expected=True)
  p = float(gates.prob_nonzero(jnp.asarray(0.3)))
  for kind, grid in density.items():
    np.testing.assert_allclose(grid, p, rtol=1e-6, err_msg=kind)


def test_figures_are_written(tmp_path):
  theta = vit.init(CFG, jax.random.key(1))
  density = plots.density_by_layer(_gates(theta), theta)
  plots.plot_density(density, str(tmp_path / "d.png"))
  plots.plot_expert_choice({"a": np.array([0.7, 0.3]), "b": np.array([0.2, 0.8])},
                           str(tmp_path / "c.png"))
  for name in ("d.png", "c.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweeps_tradeoff_figure_is_written(tmp_path):
  from experiments import figures

  figures.plot_tradeoff([{"tau": 0.5, "experts": 4, "id": 60, "ood": 50, "id_ci": 1, "ood_ci": 1},
                         {"tau": 0.9, "experts": 4, "id": 61, "ood": 52}], str(tmp_path / "t.png"))
  assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
