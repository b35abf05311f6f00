"""The XLA reference backend against the dense float32 FFN."""
import jax
import jax.numpy as jnp
import pytest
from ffn_checks import SparseFFNChecks

from sparse_jax import ops


class TestXLAReference(SparseFFNChecks):
  implementation = "xla"


def test_pallas_unavailable_on_cpu_raises_and_auto_falls_back(key):
  x = jax.random.normal(key, (8, 64))
  w = jax.random.normal(key, (256, 64))
  if jax.default_backend() == "gpu":
    pytest.skip("CPU-only check")
  with pytest.raises(NotImplementedError):
    ops.gated_sparse_ffn(x, w, w, w, implementation="pallas")
  y, _ = ops.gated_sparse_ffn(x, w, w, w)  # None: falls back to XLA
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())
