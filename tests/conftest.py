"""Settings and small fixtures shared by the whole test suite."""

import jax
import jax.numpy as jnp
import pytest

from bpalt import data, models, nn

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


@pytest.fixture
def random_batch():
    """A random batch of 16 inputs in [0, 1) of shape (16, 8, 8, 1) and integer labels."""
    x_key, y_key = jax.random.split(jax.random.key(123))
    x = jax.random.uniform(x_key, (16, 8, 8, 1))
    y = jax.random.randint(y_key, (16,), 0, 10)
    return x, y
