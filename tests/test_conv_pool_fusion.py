"""A convolution that ``nn.serial`` fuses with its pool equals its layers run one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import models, nn

RTOL, ATOL = 2e-5, 2e-5


def _uniform(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)


def _layers(case):
    features, kernel, padding, activations, reduce, window, pool_padding = case["layers"]
    pool = nn.max_pool if reduce == "max" else nn.avg_pool
    conv = nn.conv2d(features, kernel, padding=padding, use_bias=case.get("bias", True))
    return [conv, *activations, pool(window, padding=pool_padding)]


CASES = {
    "lenet first block": {
        "input": (28, 28, 1),
        "layers": (6, 5, "VALID", [nn.relu], "max", 2, "VALID"),
    },
    "lenet second block": {
        "input": (12, 12, 6),
        "layers": (16, 5, "VALID", [nn.relu], "max", 2, "VALID"),
    },
    "odd sizes cropped, two activations, average": {
        "input": (13, 11, 3),
        "layers": (4, 5, "VALID", [nn.tanh, nn.sigmoid], "avg", 2, "VALID"),
    },
    "SAME convolution, SAME pool that divides": {
        "input": (10, 10, 2),
        "layers": (3, (5, 6), "SAME", [nn.relu], "max", 2, "SAME"),
    },
    "window 3, no activation, no bias": {
        "input": (9, 10, 2),
        "layers": (3, 5, "VALID", [], "max", 3, "VALID"),
        "bias": False,
    },
}


def _params(layers, input_shape, seed):
    """Draw every layer's params of the shapes its ``init`` gives, uniform in [-1, 1)."""
    _, shapes = nn.serial(*layers).init(jax.random.key(0), input_shape)
    leaves, treedef = jax.tree.flatten(shapes)
    drawn = [_uniform(seed + index, leaf.shape) for index, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, drawn)


def _one_by_one(layers, params, x, feedback=None):
    for index, layer in enumerate(layers):
        if feedback is None:
            x = layer.apply(params[index], x)
        else:
            x = layer.feedback_apply(params[index], feedback[index], x)
    return x


def _conv_pool_reference(case, params, x):
    """Compute the block's value with ``lax.conv_general_dilated`` and NumPy pooling."""
    features, kernel, padding, activations, reduce, window, _ = case["layers"]
    y = lax.conv_general_dilated(
        x,
        params[0]["w"],
        (1, 1),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    if "b" in params[0]:
        y = y + params[0]["b"].reshape(1, 1, 1, -1)
    for activation in activations:
        y = activation.apply((), y)
    y = np.asarray(y, np.float64)
    n, h, w, c = y.shape
    oh, ow = h // window, w // window
    cells = y[:, : oh * window, : ow * window].reshape(n, oh, window, ow, window, c)
    return cells.max(axis=(2, 4)) if reduce == "max" else cells.mean(axis=(2, 4))


@pytest.mark.parametrize("name", CASES)
def test_fused_block_equals_layers_one_by_one(name):
    case = CASES[name]
    layers = _layers(case)
    block = nn.serial(*layers)
    assert nn._fusion_at(layers, 0) is not None
    params = _params(layers, case["input"], seed=1)
    feedback = _params(layers, case["input"], seed=20)
    x = _uniform(3, (3, *case["input"]))

    fused = jax.jit(block.apply)(params, x)
    layer_by_layer = jax.jit(lambda p, x: _one_by_one(layers, p, x))(params, x)
    np.testing.assert_allclose(fused, layer_by_layer, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(fused, _conv_pool_reference(case, params, x), rtol=1e-4, atol=1e-4)

    cotangent = _uniform(4, fused.shape)

    def objective(fn):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(fn(p, x) * cotangent), (0, 1)))(params, x)

    expected = objective(lambda p, x: _one_by_one(layers, p, x))
    actual = objective(block.apply)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    tangent = _params(layers, case["input"], seed=40)

    def tangent_out(fn):
        return jax.jit(lambda p, t: jax.jvp(lambda q: fn(q, x), (p,), (t,))[1])(params, tangent)

    jvp_fused = tangent_out(block.apply)
    jvp_layers = tangent_out(lambda p, x: _one_by_one(layers, p, x))
    np.testing.assert_allclose(jvp_fused, jvp_layers, rtol=RTOL, atol=ATOL)

    feedback_expected = objective(lambda p, x: _one_by_one(layers, p, x, feedback))
    feedback_actual = objective(lambda p, x: block.feedback_apply(p, feedback, x))
    for got, want in zip(jax.tree.leaves(feedback_actual), jax.tree.leaves(feedback_expected)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert not np.allclose(feedback_actual[1], actual[1], rtol=0.1)


def test_fused_max_splits_ties():
    # A blank input makes every window of the output equal to the bias: four-way ties.
    layers = [nn.conv2d(3, 5, padding="VALID"), nn.identity, nn.max_pool(2)]
    block = nn.serial(*layers)
    params = _params(layers, (12, 12, 1), seed=5)
    x = jnp.zeros((2, 12, 12, 1)).at[0, 2:6, 3:7].set(1.0)

    def objective(fn):
        return jax.jit(jax.grad(lambda p: jnp.sum(fn(p, x) ** 2)))(params)

    actual = objective(block.apply)
    expected = objective(lambda p, x: _one_by_one(layers, p, x))
    np.testing.assert_allclose(actual[0]["b"], expected[0]["b"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(actual[0]["w"], expected[0]["w"], rtol=RTOL, atol=ATOL)


def test_fused_block_under_vmap():
    layers = _layers(CASES["lenet second block"])
    block = nn.serial(*layers)
    seeds = [_params(layers, (12, 12, 6), seed=10 * s) for s in range(3)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *seeds)
    x = _uniform(7, (4, 12, 12, 6))

    def loss(p):
        return jnp.sum(block.apply(p, x) ** 2)

    batched = jax.jit(jax.vmap(jax.grad(loss)))(stacked)
    for index, params in enumerate(seeds):
        alone = jax.grad(lambda p: jnp.sum(_one_by_one(layers, p, x) ** 2))(params)
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(alone)):
            np.testing.assert_allclose(got[index], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "layers",
    [
        [nn.conv2d(4, 3), nn.relu, nn.max_pool(2)],
        [nn.conv2d(4, 5, stride=2), nn.relu, nn.max_pool(2)],
        [nn.conv2d(4, 5, implementation="xla"), nn.relu, nn.max_pool(2)],
        [nn.conv2d(4, 5), nn.relu, nn.max_pool(3, stride=2)],
        [nn.conv2d(4, 5), nn.flatten],
    ],
    ids=["3x3 kernel", "stride 2", "xla convolution", "overlapping pool", "no pool"],
)
def test_other_blocks_stay_unfused(layers):
    assert nn._fusion_at(layers, 0) is None


def test_same_pool_not_dividing_stays_unfused():
    layers = [nn.conv2d(3, 5, padding="SAME"), nn.relu, nn.max_pool(2, padding="SAME")]
    block = nn.serial(*layers)
    params = _params(layers, (11, 11, 2), seed=2)
    x = _uniform(3, (2, 11, 11, 2))
    np.testing.assert_allclose(
        block.apply(params, x), _one_by_one(layers, params, x), rtol=RTOL, atol=ATOL
    )
    assert block.apply(params, x).shape == (2, 6, 6, 3)


def test_lenet_blocks_are_fused():
    network = models.lenet()
    assert network.block_shapes[:2] == ((12, 12, 6), (4, 4, 16))
    for block in network.blocks[:2]:
        params = block.init(jax.random.key(0), (28, 28, 1))[1]
        assert len(params) == 3
    layers = [nn.conv2d(6, 5, padding="VALID"), nn.relu, nn.max_pool(2)]
    assert nn._fusion_at(layers, 0)[0] == 3


def test_replaced_feedback_stays_unfused():
    # Sign-symmetry style feedback: the input gradient through sign(w) instead of w.
    conv = nn.conv2d(3, 5, padding="VALID")

    def sign_feedback_apply(params, feedback, x):
        return conv.feedback_apply(params, {"w": jnp.sign(params["w"])}, x)

    layers = [conv._replace(feedback_apply=sign_feedback_apply), nn.relu, nn.max_pool(2)]
    assert nn._fusion_at(layers, 0) is None
    block = nn.serial(*layers)
    params = _params(layers, (12, 12, 2), seed=3)
    x = _uniform(4, (2, 12, 12, 2))

    def input_grad(fn):
        return jax.grad(lambda x: jnp.sum(fn(x) ** 2))(x)

    actual = input_grad(lambda x: block.feedback_apply(params, params, x))
    expected = input_grad(lambda x: _one_by_one(layers, params, x, params))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_input_narrower_than_pool_stays_unfused():
    # Params sized for 12 x 12 inputs; a 5 x 5 input leaves one output row for a 2 x 2 pool.
    layers = [nn.conv2d(4, 5, padding="VALID"), nn.relu, nn.max_pool(2)]
    block = nn.serial(*layers)
    params = _params(layers, (12, 12, 2), seed=6)
    x = _uniform(7, (1, 5, 5, 2))
    message = "pool window 2x2 with VALID padding does not fit input 1x1"
    with pytest.raises(ValueError, match=message):
        block.apply(params, x)
    with pytest.raises(ValueError, match=message):
        _one_by_one(layers, params, x)
