"""Check the hand-written backward passes of bpalt.manual against JAX autodiff.

Each oracle is `jax.grad` or `jax.vjp` of a plain forward written in this file,
so a bug shared by a manual forward and its manual backward cannot hide.

The dense and convolution tests draw inputs from multiples of 1/4 in [-1, 1].
Their products are multiples of 1/16, and every sum in these small shapes stays
far below 2**24 / 16, so float32 adds them without rounding in any order, as
long as the backend sums the products directly. A correct backward pass then
matches the oracle exactly, and the tolerances rtol=1e-5, atol=1e-6 matter
mainly for the sigmoid tests.
"""

import ast
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import manual

RTOL = 1e-5
ATOL = 1e-6


def _dyadic(rng, shape):
    """Draw float32 values from {-1, -3/4, ..., 3/4, 1}, which float32 sums exactly."""
    return jnp.asarray(rng.integers(-4, 5, size=shape) / 4, dtype=jnp.float32)


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Oracle independence
# ---------------------------------------------------------------------------

_AUTODIFF_NAMES = {
    "grad",
    "value_and_grad",
    "vjp",
    "jvp",
    "jacobian",
    "jacrev",
    "jacfwd",
    "hessian",
    "linear_transpose",
    "linearize",
}


def test_manual_source_has_no_autodiff():
    tree = ast.parse(inspect.getsource(manual))

    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _AUTODIFF_NAMES:
            used.add(node.attr)
        if isinstance(node, ast.Name) and node.id in _AUTODIFF_NAMES:
            used.add(node.id)
        if isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names if alias.name in _AUTODIFF_NAMES)

    assert used == set()


# ---------------------------------------------------------------------------
# Chain rule
# ---------------------------------------------------------------------------


def test_chain_rule_known_values():
    f, (df_dx, df_dy, df_dz) = manual.chain_rule_example(-2.0, 5.0, -4.0)

    assert float(f) == -12.0
    assert float(df_dx) == -4.0
    assert float(df_dy) == -4.0
    assert float(df_dz) == 3.0


def test_chain_rule_matches_autodiff():
    def f(x, y, z):
        return (x + y) * z

    for x, y, z in [(1.5, -0.25, 2.0), (0.0, 3.0, -7.5), (-1.0, -1.0, 0.5)]:
        _, grads = manual.chain_rule_example(x, y, z)
        expected = jax.grad(f, argnums=(0, 1, 2))(x, y, z)
        for actual, oracle in zip(grads, expected, strict=True):
            _assert_close(actual, oracle)


# ---------------------------------------------------------------------------
# Dense layer
# ---------------------------------------------------------------------------


def _dense_case(seed=0, batch=5, n_in=4, n_out=3):
    rng = np.random.default_rng(seed)
    x = _dyadic(rng, (batch, n_in))
    w = _dyadic(rng, (n_in, n_out))
    b = _dyadic(rng, (n_out,))
    grad_y = _dyadic(rng, (batch, n_out))
    return x, w, b, grad_y


@jax.jit
def _dense_oracle(x, w, b, grad_y):
    def forward(x, w, b):
        return x @ w + b[None, :]

    y, pullback = jax.vjp(forward, x, w, b)
    return y, pullback(grad_y)


def test_dense_forward_matches_plain():
    x, w, b, grad_y = _dense_case()
    y, _ = _dense_oracle(x, w, b, grad_y)

    _assert_close(manual.dense_forward(x, w, b), y)


@pytest.mark.parametrize("batch,n_in,n_out", [(5, 4, 3), (1, 6, 1), (8, 1, 7)])
def test_dense_backward_matches_vjp(batch, n_in, n_out):
    x, w, b, grad_y = _dense_case(seed=batch, batch=batch, n_in=n_in, n_out=n_out)
    _, (oracle_x, oracle_w, oracle_b) = _dense_oracle(x, w, b, grad_y)

    grad_x, grad_w, grad_b = manual.dense_backward(x, w, grad_y)

    assert grad_x.shape == x.shape
    assert grad_w.shape == w.shape
    assert grad_b.shape == b.shape
    _assert_close(grad_x, oracle_x)
    _assert_close(grad_w, oracle_w)
    _assert_close(grad_b, oracle_b)


def test_dense_rejects_mismatched_features():
    x = jnp.zeros((2, 4))
    w = jnp.zeros((5, 3))

    with pytest.raises(ValueError, match=r"x has 4 input features but w has 5 rows"):
        manual.dense_forward(x, w, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"x has 4 input features but w has 5 rows"):
        manual.dense_backward(x, w, jnp.zeros((2, 3)))


def test_dense_backward_rejects_bad_grad_y():
    x, w, _, _ = _dense_case()

    with pytest.raises(ValueError, match=r"grad_y must have shape .*\(5, 3\), got \(5, 4\)"):
        manual.dense_backward(x, w, jnp.zeros((5, 4)))


# ---------------------------------------------------------------------------
# Sigmoid with binary cross-entropy
# ---------------------------------------------------------------------------


@jax.jit
def _bce_oracle(logits, labels):
    """Mean BCE written from its definition, via log-sigmoid for stability."""
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return jnp.mean(-labels * log_p - (1 - labels) * log_not_p)


_bce_oracle_grad = jax.jit(jax.grad(_bce_oracle))


def test_sigmoid_bce_matches_definition():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(6, 3)) * 3, dtype=jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=(6, 3)), dtype=jnp.float32)

    _assert_close(manual.sigmoid_bce(logits, labels), _bce_oracle(logits, labels))


@pytest.mark.parametrize("soft_labels", [False, True])
def test_sigmoid_bce_backward_matches_grad(soft_labels):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 5)) * 3, dtype=jnp.float32)
    if soft_labels:
        labels = jnp.asarray(rng.uniform(size=(4, 5)), dtype=jnp.float32)
    else:
        labels = jnp.asarray(rng.integers(0, 2, size=(4, 5)), dtype=jnp.float32)

    grad = manual.sigmoid_bce_backward(logits, labels)
    oracle = _bce_oracle_grad(logits, labels)

    # The mean over 20 elements makes gradients of order 1/20, so scale atol.
    np.testing.assert_allclose(grad, oracle, rtol=RTOL, atol=ATOL / 20)


def test_sigmoid_bce_large_logits_stay_finite():
    logits = jnp.array([100.0, -100.0, 100.0, -100.0], dtype=jnp.float32)
    labels = jnp.array([0.0, 0.0, 1.0, 1.0], dtype=jnp.float32)

    loss = manual.sigmoid_bce(logits, labels)
    grad = manual.sigmoid_bce_backward(logits, labels)

    # Confidently wrong predictions cost |z| = 100 each, right ones about 0.
    assert np.isfinite(float(loss))
    _assert_close(loss, 200.0 / 4)
    assert np.all(np.isfinite(np.asarray(grad)))
    _assert_close(grad, jnp.array([0.25, 0.0, 0.0, -0.25]))
    _assert_close(grad, _bce_oracle_grad(logits, labels))


def test_sigmoid_bce_rejects_shape_mismatch():
    pattern = r"labels must have the shape of logits \(3,\), got \(4,\)"
    with pytest.raises(ValueError, match=pattern):
        manual.sigmoid_bce_backward(jnp.zeros(3), jnp.zeros(4))


# ---------------------------------------------------------------------------
# Gradient descent
# ---------------------------------------------------------------------------


def test_gradient_descent_step_matches_grad():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 3)), dtype=jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=(8, 1)), dtype=jnp.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=(3, 1)), dtype=jnp.float32),
        "b": jnp.zeros((1,), dtype=jnp.float32),
    }
    learning_rate = 0.1

    @jax.jit
    def loss(params):
        return _bce_oracle(x @ params["w"] + params["b"][None, :], labels)

    grads = jax.jit(jax.grad(loss))(params)
    updated = manual.gradient_descent_update(params, grads, learning_rate)

    assert set(updated) == {"w", "b"}
    _assert_close(updated["w"], params["w"] - learning_rate * grads["w"])
    _assert_close(updated["b"], params["b"] - learning_rate * grads["b"])
    assert float(loss(updated)) < float(loss(params))


# ---------------------------------------------------------------------------
# 2-D convolution
# ---------------------------------------------------------------------------

# (height, width, kernel_h, kernel_w, in_channels, out_channels, stride, padding)
CONV_CASES = [
    (7, 7, 3, 3, 1, 2, 1, "VALID"),
    (7, 7, 3, 3, 2, 3, 1, "SAME"),
    (8, 8, 3, 3, 3, 4, 1, "SAME"),
    (8, 8, 3, 3, 1, 2, 2, "VALID"),  # one leftover row and column
    (7, 7, 3, 3, 2, 2, 2, "VALID"),  # windows cover every row
    (8, 8, 3, 3, 3, 4, 2, "SAME"),
    (7, 7, 3, 3, 2, 3, 2, "SAME"),
    (7, 9, 2, 3, 3, 4, 1, "SAME"),  # even kernel height: pad 0 low, 1 high
    (7, 9, 2, 3, 2, 3, 1, "VALID"),
    (7, 9, 2, 3, 2, 3, 2, "VALID"),  # one leftover row
    (7, 9, 2, 3, 1, 2, 2, "SAME"),
    (8, 8, 5, 5, 1, 4, 1, "VALID"),
    (8, 8, 5, 5, 2, 3, 2, "VALID"),  # one leftover row and column
    (7, 7, 5, 5, 3, 2, 2, "SAME"),
    (7, 9, 5, 5, 3, 2, 1, "SAME"),
    (8, 8, 3, 3, 2, 2, 3, "VALID"),  # stride 3, two leftover rows and columns
    (7, 9, 2, 3, 2, 2, 3, "SAME"),
]


def _conv_oracle(x, w, b, grad_y, stride, padding):
    """Forward with lax's own padding string, and its pullback of grad_y."""

    def forward(x, w, b):
        y = lax.conv_general_dilated(
            x,
            w,
            window_strides=(stride, stride),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )
        return y + b[None, None, None, :]

    y, pullback = jax.vjp(forward, x, w, b)
    return y, pullback(grad_y)


@functools.partial(jax.jit, static_argnames=("stride", "padding"))
def _conv_manual_and_oracle(x, w, b, grad_y, stride, padding):
    # Compile one program per case. Eager mode compiles every small op
    # separately, which took several seconds for the table on a 2-core CPU.
    y = manual.conv2d_forward(x, w, b, stride=stride, padding=padding)
    grads = manual.conv2d_backward(x, w, grad_y, stride=stride, padding=padding)
    oracle_y, oracle_grads = _conv_oracle(x, w, b, grad_y, stride, padding)
    return (y, grads), (oracle_y, oracle_grads)


def _conv_case(case, seed=0, batch=2):
    height, width, kernel_h, kernel_w, c_in, c_out, stride, padding = case
    rng = np.random.default_rng(seed)
    x = _dyadic(rng, (batch, height, width, c_in))
    w = _dyadic(rng, (kernel_h, kernel_w, c_in, c_out))
    b = _dyadic(rng, (c_out,))

    # The output shape follows from lax's own SAME/VALID rule.
    out_shape = jax.eval_shape(
        lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        ),
        x,
        w,
    ).shape
    grad_y = _dyadic(rng, out_shape)
    return x, w, b, grad_y, stride, padding


def _case_id(case):
    height, width, kernel_h, kernel_w, c_in, c_out, stride, padding = case
    return f"{height}x{width}-k{kernel_h}x{kernel_w}-c{c_in}to{c_out}-s{stride}-{padding}"


@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv2d_matches_autodiff(case):
    x, w, b, grad_y, stride, padding = _conv_case(case)

    manual_out, oracle_out = _conv_manual_and_oracle(x, w, b, grad_y, stride, padding)
    y, (grad_x, grad_w, grad_b) = manual_out
    oracle_y, (oracle_x, oracle_w, oracle_b) = oracle_out

    assert y.shape == oracle_y.shape
    _assert_close(y, oracle_y)
    assert grad_x.shape == x.shape
    assert grad_w.shape == w.shape
    assert grad_b.shape == b.shape
    _assert_close(grad_x, oracle_x)
    _assert_close(grad_w, oracle_w)
    _assert_close(grad_b, oracle_b)


def test_conv2d_backward_zero_on_unused_rows():
    # 8 rows, kernel 3, stride 2, VALID: windows start at 0, 2, 4 and reach
    # row 6 at most, so row 7 and column 7 never touch the output.
    rng = np.random.default_rng(4)
    x = _dyadic(rng, (1, 8, 8, 1))
    w = jnp.ones((3, 3, 1, 2), dtype=jnp.float32)
    grad_y = jnp.ones((1, 3, 3, 2), dtype=jnp.float32)

    grad_x, _, _ = manual.conv2d_backward(x, w, grad_y, stride=2, padding="VALID")

    np.testing.assert_array_equal(grad_x[:, 7, :, :], 0.0)
    np.testing.assert_array_equal(grad_x[:, :, 7, :], 0.0)
    assert np.all(np.asarray(grad_x[:, :7, :7, :]) > 0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"padding": "same"}, r"padding must be one of \('SAME', 'VALID'\), got 'same'"),
        ({"padding": "FULL"}, r"padding must be one of .*got 'FULL'"),
        ({"stride": 0}, r"stride must be a positive int .*got 0"),
        ({"stride": -1}, r"stride must be a positive int .*got -1"),
        ({"stride": 1.5}, r"stride must be a positive int .*got 1.5"),
    ],
    ids=["lowercase-same", "full", "stride-0", "stride-negative", "stride-float"],
)
def test_conv2d_rejects_bad_arguments(kwargs, pattern):
    x = jnp.zeros((1, 5, 5, 2))
    w = jnp.zeros((3, 3, 2, 4))
    grad_y = jnp.zeros((1, 3, 3, 4))

    with pytest.raises(ValueError, match=pattern):
        manual.conv2d_forward(x, w, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        manual.conv2d_backward(x, w, grad_y, **kwargs)


def test_conv2d_rejects_channel_mismatch():
    x = jnp.zeros((1, 5, 5, 3))
    w = jnp.zeros((3, 3, 2, 4))
    pattern = r"x has 3 in channels \(last axis\) but w has 2 \(axis 2 of HWIO\)"

    with pytest.raises(ValueError, match=pattern):
        manual.conv2d_forward(x, w)
    with pytest.raises(ValueError, match=pattern):
        manual.conv2d_backward(x, w, jnp.zeros((1, 3, 3, 4)))


def test_conv2d_backward_rejects_bad_grad_y():
    x = jnp.zeros((1, 5, 5, 2))
    w = jnp.zeros((3, 3, 2, 4))

    with pytest.raises(ValueError, match=r"grad_y must have .*\(1, 3, 3, 4\), got \(1, 5, 5, 4\)"):
        manual.conv2d_backward(x, w, jnp.zeros((1, 5, 5, 4)))


def test_conv2d_rejects_kernel_larger_than_input():
    x = jnp.zeros((1, 2, 5, 1))
    w = jnp.zeros((3, 3, 1, 1))

    with pytest.raises(ValueError, match=r"kernel of size 3 does not fit an input of size 2"):
        manual.conv2d_forward(x, w, padding="VALID")
