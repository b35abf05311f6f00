import os

# Tests run on the CPU with several virtual devices available for sharding tests; kernels are
# checked in Mosaic GPU interpret mode. Must be set before jax is imported anywhere.
# The suite spends much of its time compiling XLA CPU programs, and the training tests run many
# steps of them. LLVM at -O1 without its expensive passes compiles about as fast as -O0 (two
# kernel test files: 136 vs 131 s, -O2 153 s; two multi-device training tests: 66 vs 72 s) and
# runs ~1.7x faster (a 60-step tiny run: 21.7 vs 37.2 s; -O2 29-31 s). Programs compiled in one test (or in a test's subprocess,
# which inherits this environment) are reused by the others through a persistent compilation
# cache that lives for the session (shared by pytest-xdist's workers).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Only where the tests run on the CPU (GPU tests compile as users do).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + (
    " --xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
    if os.environ["JAX_PLATFORMS"] == "cpu" else ""))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache_dir = tempfile.mkdtemp(prefix="sparse_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir  # inherited by workers: they share it
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)  # only where it was made
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import itertools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

# orbax saves a replicated array "replica-parallel" (one slice per device, each an eager slice
# op) unless JAX_PLATFORMS names a GPU (its default there is off). On the 8 virtual CPU devices
# that is thousands of tiny slices per run: 0.90 instead of 0.26 s per save of the tiny state.
# The tests save as the GPU machines do.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)

_seed = itertools.count(int.from_bytes(os.urandom(4), "little"))


@pytest.fixture
def key():
  """A fresh random key per test (seed printed on failure through the test id's log)."""
  seed = next(_seed)
  print(f"random seed: {seed}")
  return jax.random.key(seed)


@pytest.fixture
def pallas_interpret():
  """Pallas kernels (and implementation="pallas") run in Mosaic GPU interpret mode on the CPU
  for this test: the one switch, ``pallas_kernels.common.interpret_mode``."""
  from pallas_kernels import common
  with common.interpret_mode(True):
    yield


def rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def ffn_problem_without_gate_ties(key, *args, tie=1e-7, **kwargs):
  """``make_ffn_problem(key, ...)`` with no gate pre-activation within f32 summation noise of 0
  (``synthetic.gate_tie_rows`` at ``tie``): there the ReLU masks of a bf16-operand GEMM and of
  the float32 reference may legitimately differ, and one flipped neuron moves a gradient row by
  O(1) (seen: a pre-activation of 6e-8, 4.5e-9 of |x| |w_g|, gave a 1.6e-2 relative dx error; the
  f32 summation noise of 256 terms is ~4e-9 of it, so 1e-7 is ~25 sigma, and ~40% of draws at
  the tests' sizes redraw). Redraws with the next key split. (The GPU tests, at sizes where
  every draw has ties, zero those rows' cotangent instead: ``synthetic.tie_free_cotangent``.)"""
  from sparse_jax.synthetic import gate_tie_rows, make_ffn_problem
  for _ in range(20):
    key, sub = jax.random.split(key)
    p = make_ffn_problem(sub, *args, **kwargs)
    if not bool(jnp.any(gate_tie_rows(p.x, p.w_gate, tie))):
      return p
  raise RuntimeError("20 draws in a row had a gate pre-activation at a ReLU tie")


def random_sparse(key, shape, density, dtype=jnp.float32):
  """Random matrix with about ``density`` nonzeros, values bounded away from zero."""
  k1, k2 = jax.random.split(key)
  vals = jax.random.normal(k1, shape, jnp.float32)
  vals = jnp.where(jnp.abs(vals) < 0.05, 0.5, vals)
  return jnp.where(jax.random.uniform(k2, shape) < density, vals, 0.0).astype(dtype)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs and traces after each test module: one pytest process runs
  ~540 tests that compile thousands of XLA CPU programs (8 virtual devices), and without this
  the process only grows."""
  yield
  jax.clear_caches()
