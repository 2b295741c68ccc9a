import atexit
import gc
import os
import shutil
import signal
import tempfile

import jax
import pytest

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

# The Ctrl-C tests need Python's own SIGINT handling, here and in the subprocesses they
# start; a shell starts background jobs with SIGINT ignored, and children inherit that.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Many tests compile the same programs (the same tiny models, steps and evaluations, in this
# process and in the subprocesses of the CLI and multi-process tests): XLA's persistent
# compilation cache, empty at the start of every session, serves the repeats. Environment
# variables, so that subprocesses share it. The process that makes the folder removes it when
# it exits (it grows past a gigabyte per run: left behind, runs fill the disk).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="eqxtl-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
# The suite's time is mostly XLA:CPU compiling small programs, and LLVM's optimisation passes
# are most of a compile: without them it ran 26% faster (735 s against 998 s on 2 cores).
# Only the machine code's speed changes (no fast-math either way), so every result a test
# checks is the same; no test asserts a speed. Subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".no-tfds-data"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Free each module's compiled executables and models when it ends: the whole suite runs
    in one process, and XLA:CPU's caches of the large parity models add up."""
    yield
    jax.clear_caches()
    gc.collect()
