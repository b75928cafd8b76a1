"""Settings and small fixtures shared by the whole test suite."""

import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpalt import data, models, nn

# XLA compilation dominates the suite's time on a small CPU. A persistent cache lets tests
# (and the command-line subprocesses they start, through the environment) reuse identical
# compiled programs. It must be set before the first compilation.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
    "jax_persistent_cache_min_entry_size_bytes",
    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)

# A feedback matrix with transposed shape can broadcast silently against a batch.
# Raising on implicit rank promotion turns such a bug into an error.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "training: runs tens of optimizer steps per case (a few seconds each); "
        "part of the default run, never skipped",
    )


@pytest.fixture(scope="session")
def draw_params():
    """Return ``draw(shapes, seed=0)``: NumPy-drawn arrays for a pytree of ``ShapeDtypeStruct``.

    Weights (rank 2 and up) are uniform in +-sqrt(3 / fan_in) with fan_in the product of all
    axes but the last, so activations keep their scale. Biases are uniform in +-0.1, nonzero
    so that a dropped bias shows. Drawing with NumPy avoids compiling ``jax.random`` for
    every new shape, which took 0.7 to 2.6 s per shape on the busy 2-core test machine.
    """

    def draw(shapes, seed=0):
        rng = np.random.default_rng(seed)

        def leaf(shape):
            bound = math.sqrt(3.0 / math.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 0.1
            return jnp.asarray(rng.uniform(-bound, bound, shape.shape), shape.dtype)

        return jax.tree.map(leaf, shapes)

    return draw


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as loaded by ``bpalt.data``."""
    return data.load_digits()


@pytest.fixture(scope="session")
def digits_batch(digits):
    """The first 64 training digits as device arrays: (64, 8, 8, 1) and (64,)."""
    return jnp.asarray(digits.x_train[:64]), jnp.asarray(digits.y_train[:64])


@pytest.fixture(scope="session")
def small_cnn():
    """The default CNN with 4 and 8 channels: fast to compile, same block layout."""
    return models.digits_cnn(channels=(4, 8))


@pytest.fixture(scope="session")
def small_mlp():
    """An MLP on 8x8 inputs with two tanh hidden blocks of 16 and 12 units."""
    return models.mlp((8, 8, 1), [16, 12], activation=nn.tanh)


@pytest.fixture(scope="session")
def random_batch():
    """A random batch: 16 inputs in [0, 1) of shape (16, 8, 8, 1) and int32 labels in 0..9."""
    rng = np.random.default_rng(123)
    x = jnp.asarray(rng.uniform(0.0, 1.0, (16, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    return x, y


@pytest.fixture
def unwritable_folders(monkeypatch):
    """Make every output folder unwritable, as a folder without write permission is.

    Running as root ignores permission bits, so ``checkpoint``'s temporary files fail
    instead.
    """
    from bpalt import checkpoint

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", deny)
