"""The benchmark workloads, defined once and shared by the benchmark and the tests.

- ``W1``: the default digits CNN (``models.digits_cnn``: 8x8x1 input, conv 3x3 16 and 32
  SAME, each followed by ReLU and max-pool 2, dense 10), batch 64, on scikit-learn's bundled
  8x8 digits.
- ``W2``: LeNet size (``models.lenet``: 28x28x1 input, conv 5x5 6 VALID, ReLU, max-pool 2,
  conv 5x5 16 VALID, ReLU, max-pool 2, dense 120, 84, 10), batch 128. It trains on the
  real MNIST t10k images when a data directory is given, otherwise on random data of the
  same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpalt import data, models
from bpalt.nn import Network


class Workload(NamedTuple):
    """A network, a batch size and the data it trains on.

    Attributes:
        name: ``"W1"`` or ``"W2"``.
        description: one line for tables.
        build: ``() -> Network``, the network.
        batch_size: examples per step.
        dataset: the ``bpalt.data`` name of the real images.
        needs_data_dir: whether ``dataset`` is read from a directory (W2) or is bundled with
            scikit-learn (W1). Without a directory, a W2-like workload uses random data.
        layers: the same network as a flat list of layers, from which the benchmark
            builds its peers (plain JAX, PyTorch): ``("conv", features, kernel, padding)``
            with stride 1, ``("relu",)``, ``("pool", window)`` (max), ``("flatten",)``,
            ``("dense", features)``.
    """

    name: str
    description: str
    build: Callable[[], Network]
    batch_size: int
    dataset: str
    needs_data_dir: bool
    layers: tuple[tuple, ...]


W1 = Workload(
    name="W1",
    description="digits CNN (8x8x1; conv 3x3 16, 32 SAME; dense 10)",
    build=models.digits_cnn,
    batch_size=64,
    dataset="digits",
    needs_data_dir=False,
    layers=(
        ("conv", 16, 3, "SAME"), ("relu",), ("pool", 2),
        ("conv", 32, 3, "SAME"), ("relu",), ("pool", 2),
        ("flatten",), ("dense", 10),
    ),
)

W2 = Workload(
    name="W2",
    description="LeNet (28x28x1; conv 5x5 6, 16 VALID; dense 120, 84, 10)",
    build=models.lenet,
    batch_size=128,
    dataset="mnist_t10k",
    needs_data_dir=True,
    layers=(
        ("conv", 6, 5, "VALID"), ("relu",), ("pool", 2),
        ("conv", 16, 5, "VALID"), ("relu",), ("pool", 2),
        ("flatten",), ("dense", 120), ("relu",), ("dense", 84), ("relu",), ("dense", 10),
    ),
)

WORKLOADS = {"W1": W1, "W2": W2}

RANDOM_EXAMPLES = 8192
"""Examples drawn when a workload runs on random data: 64 batches of W2."""


def get(name: str) -> Workload:
    """Return the workload called ``name`` (``"W1"`` or ``"W2"``, case-insensitive)."""
    key = str(name).strip().upper()
    if key not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; accepted: {', '.join(WORKLOADS)}")
    return WORKLOADS[key]


def random_data(
    network: Network, num_examples: int, seed: int = 0, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform images in [0, 1) and uniform integer labels for ``network``'s input shape.

    Returns:
        ``x`` (num_examples, *input_shape) float32 and ``y`` (num_examples,) int32.
    """
    rng = np.random.default_rng(seed)
    x = rng.random((num_examples, *network.input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, num_examples, dtype=np.int32)
    return x, y


def training_data(
    workload: Workload, data_dir: str | None = None, seed: int = 0
) -> tuple[jax.Array, jax.Array, str]:
    """Load the training images and labels of ``workload`` onto the device.

    W1 always reads the bundled digits. W2 reads MNIST t10k from ``data_dir`` and falls back
    to ``RANDOM_EXAMPLES`` random examples of the same shape without one.

    Returns:
        ``(x, y, source)``: ``x`` (n, *input_shape) float32, ``y`` (n,) int32 and a short
        description of where the data came from.
    """
    network = workload.build()
    if workload.needs_data_dir and data_dir is None:
        x, y = random_data(network, RANDOM_EXAMPLES, seed)
        source = f"random data, {RANDOM_EXAMPLES} examples (no data directory given)"
    else:
        dataset = data.load(workload.dataset, data_dir if workload.needs_data_dir else None)
        data.check_input_shape(dataset, network.input_shape)
        x, y = dataset.x_train, dataset.y_train
        source = f"{dataset.name} training images, {x.shape[0]} examples"
    return jnp.asarray(x), jnp.asarray(y), source


def first_batch(x: jax.Array, y: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """Return the first ``batch_size`` examples, repeated when the set is smaller."""
    if x.shape[0] < batch_size:
        repeats = -(-batch_size // x.shape[0])
        x, y = jnp.tile(x, (repeats,) + (1,) * (x.ndim - 1)), jnp.tile(y, repeats)
    return x[:batch_size], y[:batch_size]
