"""Layers and the Network: shapes, NumPy references, the feedback path and argument checks."""

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import losses, models, nn, rules

KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-5


def _uniform(seed, shape):
    """NumPy-drawn float32 values in [-1, 1), free of jax.random compilation."""
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape), jnp.float32)


def _same_pads(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def _windows(x, kernel, stride, padding, fill):
    """Yield ``(i, j, window)`` with window (n, kh, kw, c) of a NumPy NHWC array."""
    kh, kw = kernel
    _, h, w, _ = x.shape
    if padding == "SAME":
        out_h, pad_h = _same_pads(h, kh, stride)
        out_w, pad_w = _same_pads(w, kw, stride)
        x = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=fill)
    else:
        out_h, out_w = (h - kh) // stride + 1, (w - kw) // stride + 1
    for i in range(out_h):
        for j in range(out_w):
            yield i, j, x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]


def _conv_reference(x, w, b, stride, padding):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    windows = list(_windows(x, w.shape[:2], stride, padding, 0.0))
    out_h, out_w = windows[-1][0] + 1, windows[-1][1] + 1
    y = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
    for i, j, window in windows:
        y[:, i, j] = np.einsum("nhwc,hwco->no", window, w)
    return y + np.asarray(b, np.float64)


def _pool_reference(x, window, stride, padding, reduce):
    x = np.asarray(x, np.float64)
    fill = -np.inf if reduce == "max" else np.nan
    windows = list(_windows(x, (window, window), stride, padding, fill))
    out_h, out_w = windows[-1][0] + 1, windows[-1][1] + 1
    y = np.zeros((x.shape[0], out_h, out_w, x.shape[-1]))
    for i, j, patch in windows:
        # NaN padding marks the cells outside the input, which the average leaves out.
        y[:, i, j] = patch.max(axis=(1, 2)) if reduce == "max" else np.nanmean(patch, axis=(1, 2))
    return y


@pytest.fixture
def init_apply(draw_params):
    """Return ``run(layer, input_shape, batch=2, seed=1)``.

    ``run`` returns the output shape that ``layer.init`` reports, params of init's shapes
    drawn by ``draw_params``, a random input and the output of the jitted ``layer.apply``.
    """

    def run(layer, input_shape, batch=2, seed=1):
        captured = []

        def init(key):
            output_shape, params = layer.init(key, input_shape)
            captured.append(tuple(output_shape))
            return params

        params = draw_params(jax.eval_shape(init, KEY), seed)
        x = _uniform(seed + 1, (batch, *input_shape))
        return captured[0], params, x, jax.jit(layer.apply)(params, x)

    return run


# --- Layer outputs against init's shapes and NumPy references --------------------------------

CONV_CASES = [
    # (input (h, w, c), features, kernel, stride, padding)
    ((8, 8, 3), 4, 3, 1, "SAME"),
    ((7, 7, 2), 5, 3, 1, "SAME"),
    ((8, 8, 3), 4, 3, 2, "SAME"),
    ((7, 9, 2), 3, 3, 2, "SAME"),
    ((8, 8, 2), 3, 2, 1, "SAME"),
    ((6, 7, 2), 3, 2, 2, "SAME"),
    ((8, 8, 3), 4, 3, 1, "VALID"),
    ((7, 7, 2), 5, 3, 2, "VALID"),
    ((8, 6, 1), 2, 2, 2, "VALID"),
    ((9, 8, 2), 3, (3, 2), 2, "VALID"),
    ((5, 6, 2), 3, (2, 3), 1, "SAME"),
]


def _conv_id(case):
    shape, _, kernel, stride, padding = case
    kernel = kernel if isinstance(kernel, int) else "x".join(map(str, kernel))
    return f"{'x'.join(map(str, shape))}-k{kernel}-s{stride}-{padding}"


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d(case, init_apply):
    input_shape, features, kernel, stride, padding = case
    patches, xla = (
        nn.conv2d(features, kernel, stride=stride, padding=padding, implementation=name)
        for name in ("patches", "xla")
    )
    output_shape, params, x, y_patches = init_apply(patches, input_shape)
    y_xla = jax.jit(xla.apply)(params, x)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    expected = _conv_reference(x, params["w"], params["b"], stride, padding)

    assert params["w"].shape == (kh, kw, input_shape[-1], features)
    assert params["b"].shape == (features,)
    assert y_patches.shape == (2, *output_shape)
    assert y_xla.shape == (2, *output_shape)
    np.testing.assert_allclose(y_patches, y_xla, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(y_patches, expected, rtol=RTOL, atol=ATOL)


GRADIENT_CASES = [
    # The kernel's tangent takes the row band (one input channel, stride 1, a kernel at
    # least nn.ROW_BAND_MIN_KERNEL_WIDTH wide) in the first two cases, and transposed
    # patches in the others.
    ((12, 12, 1), 3, 5, 1, "VALID"),
    ((11, 13, 1), 2, (4, 6), 1, "SAME"),
    ((7, 6, 2), 3, 3, 2, "SAME"),
    ((6, 6, 1), 3, 3, 1, "SAME"),
    ((13, 12, 1), 2, (3, 5), 3, "VALID"),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=_conv_id)
def test_conv2d_patches_derivatives_equal_xla(case, init_apply):
    input_shape, features, kernel, stride, padding = case
    layers = [
        nn.conv2d(features, kernel, stride=stride, padding=padding, implementation=name)
        for name in ("patches", "xla")
    ]
    _, params, x, _ = init_apply(layers[0], input_shape)
    tangents = (jax.tree.map(jnp.cos, params), jnp.sin(x))

    def gradient(layer):
        return jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x))), (0, 1)))(
            params, x
        )

    def forward_derivative(layer):
        return jax.jit(jax.jvp, static_argnums=0)(layer.apply, (params, x), tangents)[1]

    patches_grads, xla_grads = gradient(layers[0]), gradient(layers[1])
    for patches_leaf, xla_leaf in zip(jax.tree.leaves(patches_grads), jax.tree.leaves(xla_grads)):
        np.testing.assert_allclose(patches_leaf, xla_leaf, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        forward_derivative(layers[0]), forward_derivative(layers[1]), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("stride,channels", [(1, 1), (2, 1), (3, 2)])
def test_row_band_convolution_equals_xla(stride, channels):
    # The layer uses the row band only at stride 1 with one channel, but the formula is general.
    x = _uniform(0, (2, 13, 12, channels))
    w = _uniform(1, (3, 5, channels, 4))
    expected = lax.conv_general_dilated(
        x, w, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    out_h, out_w = expected.shape[1:3]
    y = jax.jit(nn._conv_by_row_band, static_argnums=(2, 3, 4))(x, w, stride, out_h, out_w)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("kernel", [3, 5])
def test_conv2d_low_precision_derivatives_keep_dtype(dtype, kernel, init_apply):
    layer = nn.conv2d(4, kernel, padding="VALID")
    _, params, x, _ = init_apply(layer, (12, 12, 1))
    low_params, low_x = jax.tree.map(lambda a: a.astype(dtype), (params, x))

    def total(p, x):
        return jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(total))(low_params, low_x)
    tangent_out = jax.jit(jax.jvp, static_argnums=0)(
        lambda p: layer.apply(p, low_x), (low_params,), (low_params,)
    )[1]
    expected = jax.jit(jax.grad(total))(params, x)
    assert grads["w"].dtype == dtype
    assert tangent_out.dtype == dtype
    np.testing.assert_allclose(
        grads["w"].astype(np.float32),
        expected["w"],
        rtol=0.05,
        atol=0.05 * np.abs(expected["w"]).max(),
    )


@pytest.mark.parametrize("width", [24, 64])
def test_row_band_only_on_narrow_inputs(width):
    kernel = (5, 5, 1, 8)
    assert nn._uses_row_band(width, kernel, 1) == (width <= nn.ROW_BAND_MAX_WIDTH_RATIO * 5)
    assert not nn._uses_row_band(width, (5, 5, 2, 8), 1)
    assert not nn._uses_row_band(width, (5, 5, 1, 8), 2)
    assert not nn._uses_row_band(width, (3, 3, 1, 8), 1)


@pytest.mark.parametrize("implementation", ["patches", "xla"])
@pytest.mark.parametrize(
    "shape,message",
    [
        ((2, 9, 9, 3), r"in_channels=1, but the input \(2, 9, 9, 3\) has 3 channels"),
        ((2, 81), r"batch of images .*\(2, 81\)"),
        ((2, 3, 9, 1), r"kernel 5x5 with VALID padding does not fit input 3x9 .*'SAME'"),
    ],
)
def test_conv2d_apply_rejects_other_input(implementation, shape, message):
    layer = nn.conv2d(3, 5, padding="VALID", implementation=implementation)
    _, params = layer.init(KEY, (9, 9, 1))
    with pytest.raises(ValueError, match=message):
        layer.apply(params, jnp.ones(shape))


def test_fused_serial_rejects_small_input():
    layers = [nn.conv2d(3, 5, padding="VALID"), nn.relu, nn.max_pool(2)]
    assert nn._fusion_at(layers, 0) is not None
    block = nn.serial(*layers)
    _, params = block.init(KEY, (12, 12, 1))
    message = "kernel 5x5 with VALID padding does not fit input 4x4"
    with pytest.raises(ValueError, match=message):
        block.apply(params, jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match=message):
        jax.jit(block.apply)(params, jnp.ones((2, 4, 4, 1)))


def test_pool_rejects_wrong_input():
    with pytest.raises(ValueError, match=r"pooling expects a batch of images .*\(2, 8, 8\)"):
        nn.max_pool(2).apply((), jnp.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="pool window 3x3 with VALID padding does not fit"):
        nn.avg_pool(3).apply((), jnp.ones((1, 2, 2, 1)))


def test_dense(init_apply):
    output_shape, params, x, y = init_apply(nn.dense(5), (7,))
    expected = np.asarray(x, np.float64) @ np.asarray(params["w"]) + np.asarray(params["b"])
    assert output_shape == (5,)
    assert params["w"].shape == (7, 5)
    assert y.shape == (2, 5)
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


def test_dense_without_bias(init_apply):
    _, params, x, y = init_apply(nn.dense(5, use_bias=False), (7,))
    assert set(params) == {"w"}
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(params["w"]), rtol=RTOL, atol=ATOL)


def test_conv2d_without_bias(init_apply):
    _, params, x, y = init_apply(nn.conv2d(3, 3, use_bias=False), (5, 5, 2))
    assert set(params) == {"w"}
    np.testing.assert_allclose(
        y, _conv_reference(x, params["w"], 0.0, 1, "SAME"), rtol=RTOL, atol=ATOL
    )


POOL_CASES = [
    # (input (h, w, c), window, stride, padding). The first four take the reshape path.
    ((8, 8, 3), 2, None, "VALID"),
    ((7, 9, 2), 2, None, "VALID"),
    ((8, 6, 2), 2, None, "SAME"),
    ((9, 9, 1), 3, 3, "VALID"),
    ((7, 7, 2), 2, None, "SAME"),
    ((7, 7, 2), 3, 2, "SAME"),
    ((8, 8, 2), 3, 2, "SAME"),
    ((8, 8, 2), 3, 2, "VALID"),
    ((6, 5, 2), 3, 1, "SAME"),
    ((6, 6, 1), 2, 1, "VALID"),
]


def _pool_id(case):
    shape, window, stride, padding = case
    return f"{'x'.join(map(str, shape))}-w{window}-s{stride}-{padding}"


@pytest.mark.parametrize("reduce", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_pool(case, reduce, init_apply):
    input_shape, window, stride, padding = case
    make = nn.max_pool if reduce == "max" else nn.avg_pool
    output_shape, params, x, y = init_apply(make(window, stride, padding), input_shape)
    expected = _pool_reference(x, window, stride or window, padding, reduce)
    assert params == ()
    assert y.shape == (2, *output_shape)
    assert expected.shape == y.shape
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", [POOL_CASES[0], POOL_CASES[5]], ids=_pool_id)
def test_max_pool_gradient(case):
    input_shape, window, stride, padding = case
    layer = nn.max_pool(window, stride, padding)
    # Distinct values give every window a unique maximum.
    x = np.random.default_rng(0).permutation(np.prod(input_shape)).astype(np.float32)
    x = jnp.asarray(x.reshape(1, *input_shape))
    y, vjp = jax.vjp(jax.jit(layer.apply, static_argnums=0), (), x)
    grad = np.asarray(vjp(jnp.ones_like(y))[1])
    # Each input cell receives 1 for every window whose maximum it is, and nothing else.
    winners = np.isin(np.asarray(x), np.asarray(y))
    assert not np.any(grad[~winners])
    assert np.all(grad[winners] >= 1)
    assert grad.sum() == y.size


def test_flatten(init_apply):
    output_shape, _, x, y = init_apply(nn.flatten, (3, 4, 2))
    assert output_shape == (24,)
    np.testing.assert_array_equal(y, np.asarray(x).reshape(2, 24))


@pytest.mark.parametrize(
    "layer,reference",
    [
        (nn.relu, lambda x: np.maximum(x, 0)),
        (nn.tanh, np.tanh),
        (nn.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
        (nn.identity, lambda x: x),
    ],
    ids=["relu", "tanh", "sigmoid", "identity"],
)
def test_activation(layer, reference, init_apply):
    output_shape, params, x, y = init_apply(layer, (3, 4))
    assert output_shape == (3, 4)
    assert params == ()
    np.testing.assert_allclose(y, reference(np.asarray(x, np.float64)), rtol=RTOL, atol=ATOL)


def test_serial(init_apply):
    first, second = nn.dense(6), nn.dense(3)
    output_shape, params, x, y = init_apply(nn.serial(first, nn.tanh, second), (4,))
    first_params, _, second_params = jax.tree.map(np.asarray, params)
    hidden = np.tanh(np.asarray(x, np.float64) @ first_params["w"] + first_params["b"])
    expected = hidden @ second_params["w"] + second_params["b"]
    assert output_shape == (3,)
    assert len(params) == 3
    assert params[1] == ()
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "build,block_shapes",
    [
        (lambda: models.digits_cnn(channels=(4, 8)), ((4, 4, 4), (2, 2, 8), (10,))),
        (models.lenet, ((12, 12, 6), (4, 4, 16), (120,), (84,), (10,))),
        (lambda: models.mlp((8, 8, 1), [16, 12], 3), ((16,), (12,), (3,))),
    ],
    ids=["digits_cnn", "lenet", "mlp"],
)
def test_network_forward_shapes(build, block_shapes):
    # Shapes only, so eval_shape suffices and nothing compiles.
    network = build()
    params = jax.eval_shape(network.init, KEY)
    x = jax.ShapeDtypeStruct((3, *network.input_shape), jnp.float32)
    outputs = jax.eval_shape(network.forward, params, x)
    assert network.block_shapes == block_shapes
    assert network.output_shape == block_shapes[-1]
    assert len(outputs) == network.num_blocks
    assert [o.shape[1:] for o in outputs] == list(block_shapes)


def test_network_forward_chains_blocks(small_cnn, draw_params):
    params = draw_params(jax.eval_shape(small_cnn.init, KEY))
    x = _uniform(1, (2, 8, 8, 1))
    outputs = jax.jit(small_cnn.forward)(params, x)
    first = jax.jit(small_cnn.blocks[0].apply)(params[0], x)
    second = jax.jit(small_cnn.blocks[1].apply)(params[1], outputs[0])
    assert len(outputs) == 3
    np.testing.assert_allclose(outputs[0], first, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(outputs[1], second, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        outputs[2], jax.jit(small_cnn.apply)(params, x), rtol=RTOL, atol=ATOL
    )


def test_network_init_rejects_other_input_shape():
    network = models.digits_cnn()
    with pytest.raises(ValueError, match=r"input shape \(28, 28, 1\) does not match.*\(8, 8, 1\)"):
        network.init(KEY, (28, 28, 1))


def test_network_init_accepts_own_input_shape():
    network = models.digits_cnn()
    shapes = jax.eval_shape(lambda key: network.init(key, [8, 8, 1]), KEY)
    assert len(shapes) == network.num_blocks
    assert shapes[0][0]["w"].shape == (3, 3, 1, 16)


def test_network_check_input_rejects_other_shape():
    network = models.digits_cnn()
    with pytest.raises(ValueError, match=r"data of shape \(28, 28, 1\)"):
        network.check_input(jnp.zeros((2, 28, 28, 1)))


# --- The feedback path ----------------------------------------------------------------------


def _cotangent_grads(fn, *args, seed=9):
    """Return the gradients of ``sum(fn(*args) * c)`` for a random cotangent ``c``, and ``c``."""
    cotangent = _uniform(seed, jax.eval_shape(fn, *args).shape)
    objective = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), range(len(args))))
    return objective(*args), cotangent


def test_feedback_linear_dense():
    x, w, feedback = _uniform(1, (4, 3)), _uniform(2, (3, 5)), _uniform(3, (3, 5))

    def matmul(x, w):
        return x @ w

    value = nn.feedback_linear(matmul, x, w, feedback)
    (grad_x, grad_w, grad_feedback), cotangent = _cotangent_grads(
        lambda x, w, b: nn.feedback_linear(matmul, x, w, b), x, w, feedback
    )
    np.testing.assert_allclose(value, x @ w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_x, cotangent @ feedback.T, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_w, x.T @ cotangent, rtol=RTOL, atol=ATOL)
    assert not np.any(np.asarray(grad_feedback))


@pytest.mark.parametrize("implementation", ["patches", "xla"])
def test_feedback_linear_conv(implementation, draw_params):
    layer = nn.conv2d(4, 3, stride=2, padding="SAME", implementation=implementation)
    shapes = jax.eval_shape(lambda key: layer.init(key, (7, 6, 3))[1], KEY)
    params, feedback = draw_params(shapes, 1), draw_params(shapes, 2)
    x = _uniform(3, (2, 7, 6, 3))

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    (grad_x, grad_params), cotangent = _cotangent_grads(
        lambda x, p: layer.feedback_apply(p, feedback, x), x, params
    )
    _, vjp_feedback = jax.vjp(lambda x: conv(x, feedback["w"]), x)
    _, vjp_weight = jax.vjp(lambda w: conv(x, w), params["w"])
    np.testing.assert_allclose(
        layer.feedback_apply(params, feedback, x), layer.apply(params, x), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(grad_x, vjp_feedback(cotangent)[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_params["w"], vjp_weight(cotangent)[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_params["b"], cotangent.sum((0, 1, 2)), rtol=RTOL, atol=ATOL)


def test_feedback_input_gradient_differs_from_true(draw_params):
    layer = nn.dense(5)
    shapes = jax.eval_shape(lambda key: layer.init(key, (3,))[1], KEY)
    params, feedback = draw_params(shapes, 1), draw_params(shapes, 2)
    x = _uniform(3, (4, 3))
    (feedback_grad,), _ = _cotangent_grads(lambda x: layer.feedback_apply(params, feedback, x), x)
    (true_grad,), _ = _cotangent_grads(lambda x: layer.apply(params, x), x)
    assert not np.allclose(feedback_grad, true_grad, rtol=0.1)


# --- Layers without bias under every rule ---------------------------------------------------


def _no_bias_network():
    return nn.Network(
        [
            nn.serial(nn.conv2d(3, 3, use_bias=False), nn.relu, nn.max_pool(2)),
            nn.serial(nn.flatten, nn.dense(6, use_bias=False), nn.tanh),
            nn.serial(nn.dense(10, use_bias=False)),
        ],
        (8, 8, 1),
    )


@pytest.mark.parametrize("name", ["bp", "fa", "dfa"])
def test_no_bias_under_rule(name, random_batch, draw_params):
    network = _no_bias_network()
    params = draw_params(jax.eval_shape(network.init, KEY))
    rule = rules.get(name, network)
    state = jax.jit(rule.init)(jax.random.key(1), params)
    grads, _, metrics = jax.jit(rule.update)(state, params, random_batch, KEY)

    def loss(params):
        x, y = random_batch
        return losses.softmax_cross_entropy(network.apply(params, x), y)

    true_grads = jax.jit(jax.grad(loss))(params)
    assert all(set(layer) == {"w"} for block in params for layer in block if layer)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(metrics["loss"]) == pytest.approx(float(loss(params)), rel=1e-5)
    # The output block's gradient is the true one under all three rules.
    np.testing.assert_allclose(grads[-1][0]["w"], true_grads[-1][0]["w"], rtol=RTOL, atol=1e-6)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
        assert np.any(np.asarray(leaf) != 0)


# --- A batch in chunks ----------------------------------------------------------------------


def _lenet_pair(chunks):
    """LeNet in one chain and the same blocks with ``batch_chunks=chunks``."""
    lenet = models.lenet()
    single = nn.Network(lenet.blocks, lenet.input_shape, batch_chunks=1)
    return single, nn.Network(lenet.blocks, lenet.input_shape, batch_chunks=chunks)


@pytest.mark.parametrize("chunks,batch", [("auto", 128), (3, 10), (4, 130)])
def test_chunked_network_equals_one_chain(chunks, batch, draw_params):
    single, chunked = _lenet_pair(chunks)
    assert chunked.chunks_for(batch) > 1
    params = draw_params(jax.eval_shape(single.init, KEY))
    x = _uniform(1, (batch, 28, 28, 1))
    y = jax.random.randint(KEY, (batch,), 0, 10)
    feedback = draw_params(jax.eval_shape(single.init, KEY), 2)

    # Jitted: op-by-op dispatch compiled every operation of LeNet on its own.
    np.testing.assert_allclose(
        jax.jit(chunked.apply)(params, x), jax.jit(single.apply)(params, x), rtol=RTOL, atol=ATOL
    )
    chunked_outputs = jax.jit(chunked.forward)(params, x)
    for got, want in zip(chunked_outputs, jax.jit(single.forward)(params, x)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    def grads(network, apply):
        return jax.jit(jax.grad(lambda p: losses.softmax_cross_entropy(apply(network, p), y)))(
            params
        )

    for apply in (
        lambda network, p: network.apply(p, x),
        lambda network, p: network.feedback_apply(p, feedback, x),
    ):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            grads(chunked, apply),
            grads(single, apply),
        )


@pytest.mark.parametrize("name", ["bp", "fa", "dfa", "hsic", "random_features"])
def test_rule_grads_equal_in_chunks(name, draw_params):
    single, chunked = _lenet_pair("auto")
    params = draw_params(jax.eval_shape(single.init, KEY))
    batch = (_uniform(1, (128, 28, 28, 1)), jax.random.randint(KEY, (128,), 0, 10))

    def grads(network):
        rule = rules.get(name, network)
        state = rule.init(jax.random.key(1), params)
        return jax.jit(rule.update)(state, params, batch, KEY)[0]

    # HSIC's matrix inverses amplify rounding, so the tolerance scales with each leaf.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-3, atol=1e-5 + 1e-4 * float(np.abs(b).max())
        ),
        grads(chunked),
        grads(single),
    )


def test_chunked_network_jvp_and_vmap(draw_params):
    single, chunked = _lenet_pair("auto")
    params = draw_params(jax.eval_shape(single.init, KEY))
    tangent = draw_params(jax.eval_shape(single.init, KEY), 3)
    x = _uniform(1, (2, 128, 28, 28, 1))

    @functools.partial(jax.jit, static_argnums=0)
    def tangent_out(network, params, tangent, x):
        return jax.jvp(lambda p: network.apply(p, x), (params,), (tangent,))[1]

    want = tangent_out(single, params, tangent, x[0])
    got = tangent_out(chunked, params, tangent, x[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    batched = jax.jit(jax.vmap(chunked.apply, in_axes=(None, 0)))(params, x)
    want = jax.jit(single.apply)(params, x[1])
    np.testing.assert_allclose(batched[1], want, rtol=RTOL, atol=ATOL)


def test_auto_chunks_follow_batch_size():
    network = models.lenet()
    assert network.batch_chunks == "auto"
    assert network.chunks_for(nn.AUTO_CHUNK_MIN_BATCH - 1) == 1
    assert network.chunks_for(nn.AUTO_CHUNK_MIN_BATCH) == nn.AUTO_BATCH_CHUNKS
    assert nn.Network(network.blocks, network.input_shape).chunks_for(1024) == 1
    assert nn.Network(network.blocks, network.input_shape, batch_chunks=8).chunks_for(5) == 5
    assert nn.Network(network.blocks, network.input_shape, np.int64(2)).chunks_for(128) == 2


# --- The flax adapter -----------------------------------------------------------------------


def test_from_flax_matches_module_apply():
    module = flax.linen.Dense(5)
    layer = nn.from_flax(module)
    output_shape, variables = layer.init(KEY, (6,))
    x = _uniform(1, (3, 6))
    assert output_shape == (5,)
    assert variables["params"]["kernel"].shape == (6, 5)
    np.testing.assert_array_equal(layer.apply(variables, x), module.apply(variables, x))


def test_from_flax_block_in_network(draw_params):
    module = flax.linen.Dense(7)
    network = nn.Network(
        [nn.serial(nn.flatten, nn.from_flax(module), nn.relu), nn.dense(10)], (8, 8, 1)
    )
    params = draw_params(jax.eval_shape(network.init, KEY))
    x = _uniform(1, (3, 8, 8, 1))
    hidden = jax.nn.relu(module.apply(params[0][1], x.reshape(3, 64)))
    assert network.block_shapes == ((7,), (10,))
    np.testing.assert_allclose(
        jax.jit(network.apply)(params, x),
        nn.dense(10).apply(params[1], hidden),
        rtol=RTOL,
        atol=ATOL,
    )


# --- Argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: nn.dense(0), "dense features must be a positive integer, got 0"),
        (lambda: nn.dense(2.5), "dense features must be a positive integer, got 2.5"),
        (lambda: nn.conv2d(0), "conv2d features must be a positive integer, got 0"),
        (lambda: nn.dense(True), "dense features must be a positive integer, got True"),
        (
            lambda: nn.dense(2**64),
            r"dense features must be at most 2\*\*63 - 1, .* got 18446744073709551616",
        ),
        (
            lambda: nn.conv2d(4, (3, 2**63)),
            r"pair of them, got \(3, 9\d+\) \(each size at most 2\*\*63 - 1\)",
        ),
        (lambda: nn.max_pool(2**63), r"pool window must be at most 2\*\*63 - 1"),
        (lambda: nn.conv2d(4, 0), "conv2d kernel_size must be a positive integer or a pair"),
        (lambda: nn.conv2d(4, (3, 0)), r"kernel_size must be .* pair of them, got \(3, 0\)"),
        (lambda: nn.conv2d(4, (3, 3, 3)), r"kernel_size must be .* pair of them, got \(3, 3, 3\)"),
        (lambda: nn.conv2d(4, stride=True), "conv2d stride must be a positive integer, got True"),
        (lambda: nn.conv2d(4, stride=0), "conv2d stride must be a positive integer, got 0"),
        (lambda: nn.conv2d(4, padding="same"), "conv2d padding must be 'SAME' or 'VALID'"),
        (lambda: nn.conv2d(4, implementation="fft"), "conv2d implementation must be one of"),
        (lambda: nn.conv2d(4, w_init="kaiming"), "unknown initializer 'kaiming'"),
        (lambda: nn.max_pool(0), "pool window must be a positive integer, got 0"),
        (lambda: nn.avg_pool(2, 0), "pool stride must be a positive integer, got 0"),
        (lambda: nn.max_pool(2, padding="FULL"), "pool padding must be 'SAME' or 'VALID'"),
        (lambda: nn.serial(), "serial needs at least one layer"),
        (lambda: nn.serial(nn.relu, "relu"), "serial argument 1 is not a Layer"),
        (lambda: nn.Network([], (8, 8, 1)), "a Network needs at least one block"),
        (lambda: nn.Network([nn.relu, None], (8, 8, 1)), "block 1 is not a Layer"),
        (
            lambda: nn.Network([nn.relu], (8, 8, 1), batch_chunks=0),
            "batch_chunks must be a positive integer or 'auto', got 0",
        ),
        (
            lambda: nn.Network([nn.relu], (8, 8, 1), batch_chunks="4"),
            "batch_chunks must be a positive integer or 'auto', got '4'",
        ),
    ],
)
def test_bad_arguments_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_integer_sizes_accepted():
    shape, params = nn.dense(np.int64(5)).init(KEY, (3,))
    assert shape == (5,)
    assert params["w"].shape == (3, 5)
    shape, params = nn.conv2d(np.int32(4), (np.int64(3), 2)).init(KEY, (8, 8, 1))
    assert shape == (8, 8, 4)
    assert params["w"].shape == (3, 2, 1, 4)
    shape, _ = nn.conv2d(4, np.int64(3)).init(KEY, (8, 8, 1))
    assert shape == (8, 8, 4)


def test_small_numpy_sizes_no_overflow():
    # 8 x 8 x 200 = 12800 features, which a uint8 product would wrap to 0.
    network = nn.Network(
        [nn.serial(nn.conv2d(np.uint8(200), 3), nn.flatten, nn.dense(np.uint8(10)))], (8, 8, 1)
    )
    params = network.init(KEY)
    assert params[0][2]["w"].shape == (12800, 10)
    assert network.apply(params, jnp.ones((2, 8, 8, 1))).shape == (2, 10)
    assert nn.max_pool(np.uint8(3), padding="SAME").init(KEY, (8, 8, 1))[0] == (3, 3, 1)
    assert nn.conv2d(4, 3, stride=np.uint8(2)).init(KEY, (8, 8, 1))[0] == (4, 4, 4)


def test_dense_on_image_raises():
    with pytest.raises(ValueError, match=r"dense expects a flat input.*\(8, 8, 1\).*flatten"):
        nn.dense(3).init(KEY, (8, 8, 1))


def test_conv2d_on_flat_input_raises():
    with pytest.raises(ValueError, match=r"conv2d expects an image input.*\(64,\)"):
        nn.conv2d(3).init(KEY, (64,))


@pytest.mark.parametrize(
    "layer,input_shape,message",
    [
        (nn.dense(2**62), (3,), r"dense weights of shape \(3, 4611686018427387904\) would"),
        (nn.conv2d(2**61, 3), (8, 8, 2), r"conv2d weights of shape \(3, 3, 2, 2305843009213693"),
    ],
)
def test_oversized_weights_rejected(layer, input_shape, message):
    with pytest.raises(ValueError, match=message + ".*use fewer features"):
        layer.init(KEY, input_shape)


@pytest.mark.parametrize("input_shape", [(8.5, 8, 1), (8, 8, 1.0), (0, 0, 1), (-8, 8, 1), (),
                                         None, "abc"])
def test_network_rejects_bad_input_shape(input_shape):
    block = nn.serial(nn.conv2d(2, 3), nn.flatten, nn.dense(3))
    with pytest.raises(ValueError, match=r"input_shape must be the shape of one example as "
                                         r"positive integers, such as \(8, 8, 1\)"):
        nn.Network([block], input_shape)


def test_input_shape_any_integer_sequence():
    block = nn.serial(nn.conv2d(2, 3), nn.flatten, nn.dense(3))
    for input_shape in ([8, 8, 1], np.array([8, 8, 1]), (np.int64(8), 8, np.uint8(1))):
        network = nn.Network([block], input_shape)
        assert network.input_shape == (8, 8, 1)
        assert all(type(d) is int for d in network.input_shape)


@pytest.mark.parametrize(
    "layer,input_shape,message",
    [
        (nn.conv2d(3, padding="SAME"), (0, 0, 1), r"conv2d takes an input shape \(height, "),
        (nn.conv2d(3, padding="SAME"), (-8, 8, 1), "conv2d takes"),
        (nn.conv2d(3, padding="SAME"), (8.5, 8, 1), "conv2d takes"),
        (nn.max_pool(2), (8, 8, 0), "pooling takes"),
        (nn.avg_pool(2), (8.0, 8, 1), "pooling takes"),
        (nn.max_pool(2), (8, 8), "pooling takes"),
        (nn.dense(5), (0,), r"dense takes an input shape \(features,\) of positive"),
        (nn.dense(5), (True,), "dense takes"),
    ],
)
def test_layer_init_rejects_bad_sizes(layer, input_shape, message):
    with pytest.raises(ValueError, match=message):
        layer.init(KEY, input_shape)


def test_conv2d_rejects_empty_images():
    layer = nn.conv2d(4, 3, padding="SAME")
    _, params = layer.init(KEY, (8, 8, 1))
    message = r"invalid input shape \(2, 0, 0, 1\): conv2d needs images"
    with pytest.raises(ValueError, match=message):
        layer.apply(params, jnp.ones((2, 0, 0, 1)))


@pytest.mark.parametrize("shape", [(2, 4), (2,)])
def test_dense_rejects_wrong_features(shape):
    layer = nn.dense(3)
    _, params = layer.init(KEY, (5,))
    with pytest.raises(ValueError, match=r"dense weights \(5, 3\) take a batch of shape "
                                         r"\(batch, 5\), got input shape"):
        layer.apply(params, jnp.ones(shape))


def test_conv2d_valid_kernel_too_large_raises():
    with pytest.raises(ValueError, match="kernel 5x5 with VALID padding does not fit input 4x4"):
        nn.conv2d(3, 5, padding="VALID").init(KEY, (4, 4, 1))


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pool_window_wider_than_input(padding):
    layer = nn.max_pool(2**40, padding=padding)
    with pytest.raises(ValueError, match="pool window 1099511627776x1099511627776"):
        layer.init(KEY, (8, 6, 1))


def test_pool_on_too_small_input_raises():
    blocks = [nn.serial(nn.conv2d(2), nn.max_pool(2)) for _ in range(4)]

    with pytest.raises(ValueError, match="pool window 2x2 with VALID padding does not fit "
                                         "input 1x1; use fewer pooling layers"):
        nn.Network([*blocks, nn.serial(nn.flatten, nn.dense(10))], (8, 8, 1))


def test_network_with_bad_block_shapes_raises():
    with pytest.raises(ValueError, match="dense expects a flat input"):
        nn.Network([nn.dense(3)], (8, 8, 1))


def test_wrong_input_shape_rejected():
    import optax

    from bpalt import train

    network = models.digits_cnn(channels=(4, 8))
    params = network.init(jax.random.key(0))
    x = jnp.zeros((2, 28, 28, 1))
    message = r"data of shape \(28, 28, 1\) per example does not match the network's input " \
        r"shape \(8, 8, 1\)"

    for method in (network.apply, network.forward):
        with pytest.raises(ValueError, match=message):
            method(params, x)

    rule = rules.get("fa", network, losses.softmax_cross_entropy)
    optimizer = optax.sgd(0.1)
    step = train.make_train_step(rule, optimizer)
    with pytest.raises(ValueError, match=message):
        step(params, rule.init(jax.random.key(1), params), optimizer.init(params),
             (x, jnp.zeros(2, jnp.int32)), jax.random.key(2))


def test_missing_batch_axis_named():
    network = models.digits_cnn(channels=(4, 8))
    params = network.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"one example of shape \(8, 8, 1\) without the batch "
                                         r"axis; pass x\[None\]"):
        network.apply(params, jnp.zeros((8, 8, 1)))


def test_fused_empty_batch_matches_layers():
    layers = [nn.conv2d(4, 5, padding="VALID"), nn.relu, nn.max_pool(2)]
    block = nn.serial(*layers)
    _, params = block.init(KEY, (12, 12, 1))
    x = jnp.zeros((0, 12, 12, 1))
    one_by_one = x
    for layer, layer_params in zip(layers, params):
        one_by_one = layer.apply(layer_params, one_by_one)
    assert one_by_one.shape == (0, 4, 4, 4)
    assert block.apply(params, x).shape == one_by_one.shape


def test_network_rejects_list_and_complex():
    network = models.digits_cnn(channels=(4, 8))
    params = network.init(jax.random.key(0))
    with pytest.raises(ValueError, match="got list; convert it with jnp.asarray"):
        network.apply(params, np.zeros((2, 8, 8, 1)).tolist())
    with pytest.raises(ValueError, match="expected real inputs, got dtype complex64"):
        network.apply(params, jnp.zeros((2, 8, 8, 1), jnp.complex64))


@pytest.mark.parametrize("shape", [(0, 8, 8, 1), ()])
def test_empty_batch_rejected(shape):
    network = models.digits_cnn(channels=(4, 8))
    params = network.init(jax.random.key(0))

    message = r"expected a non-empty batch of shape \(batch, \*\(8, 8, 1\)\)"
    with pytest.raises(ValueError, match=message):
        network.apply(params, jnp.zeros(shape))
