"""Test setup: 8 fake CPU devices (set before jax is imported), exact fp32 matmuls, a shared compile cache."""

import os
import tempfile

# 8 fake CPU devices for the mesh tests. (LLVM optimisation level 0 would compile faster, but it also drops
# FMA contraction and moved one encoder hidden state of the parity tests past its rounding bound.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The AOT tests load libtpu for compile-only TPU devices; parallel workers would otherwise fight over its lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (one tiny model, several runs): share compilations across them.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "diffusion_gemma_test_jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: trains a model, runs a CLI in a subprocess or executes a notebook (seconds to a minute "
                   "each); `-m \"not slow\"` is the fast inner loop, the full suite stays the CI command")
