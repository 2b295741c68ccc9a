import gc
import os

import jax
import pytest

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".no-tfds-data"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Free each module's compiled executables and models when it ends: the whole suite runs
    in one process, and XLA:CPU's caches of the large parity models add up."""
    yield
    jax.clear_caches()
    gc.collect()
