"""Model constructors: shapes and the patch encoder against a plain strided convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import models


def test_patch_cnn_default_shapes():
    network = models.patch_cnn()
    assert network.block_shapes == ((6, 6, 32), (6, 6, 16), (10,))


def test_patch_cnn_grid_follows_patch_and_stride():
    network = models.patch_cnn(input_shape=(32, 32, 3), patch=16, stride=8, channels=(8,))
    assert network.block_shapes == ((3, 3, 8), (10,))


def test_patch_cnn_first_block_is_strided_patch_encoder():
    network = models.patch_cnn(channels=(4, 4), kernel=1)
    params = network.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))

    conv = params[0][0]
    expected = lax.conv_general_dilated(
        x, conv["w"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = jnp.maximum(expected + conv["b"].reshape(1, 1, 1, -1), 0.0)
    actual = network.blocks[0].apply(params[0], x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_patch_cnn_rejects_no_hidden_block():
    with pytest.raises(ValueError, match="at least one hidden block"):
        models.patch_cnn(channels=())


def test_patch_cnn_registered_by_name():
    assert models.MODELS["patch_cnn"] is models.patch_cnn
