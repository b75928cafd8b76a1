"""Direct feedback alignment against backprop, hand-derived formulas and its feedback init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpalt import losses, models, nn, rules
from bpalt.rules.direct_feedback_alignment import DirectFeedbackAlignmentState

KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-6


def _assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for actual_leaf, expected_leaf in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(actual_leaf, expected_leaf, rtol=rtol, atol=atol)


def _block_cosines(first, second):
    """Cosine between two directions, one value per block (all leaves of a block joined)."""
    cosines = []
    for first_block, second_block in zip(first, second):
        a = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(first_block)])
        b = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(second_block)])
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return cosines


def _linear(block):
    """The params of the one dense or conv layer in a block (a dict with "w")."""
    (layer,) = [layer for layer in block if layer]
    return layer


def _backprop(network):
    """Return a jitted ``(params, batch) -> (loss, gradient)`` of softmax cross-entropy."""

    def loss(params, batch):
        x, y = batch
        return losses.softmax_cross_entropy(network.apply(params, x), y)

    return jax.jit(jax.value_and_grad(loss))


def _jitted_rule(network, **hyperparameters):
    rule = rules.direct_feedback_alignment(network, **hyperparameters)
    return rule._replace(update=jax.jit(rule.update))


@pytest.fixture(scope="module")
def one_hidden():
    # Blocks: [flatten, dense 32, tanh] and [dense 10].
    return models.mlp((8, 8, 1), [32], activation=nn.tanh)


@pytest.fixture(scope="module")
def cnn():
    return models.digits_cnn()


@pytest.fixture(scope="module")
def cnn_params(cnn):
    return cnn.init(jax.random.key(1))


@pytest.fixture(scope="module")
def cnn_rule(cnn):
    return _jitted_rule(cnn)


@pytest.fixture(scope="module")
def cnn_backprop(cnn):
    return _backprop(cnn)


@pytest.fixture(scope="module")
def cnn_state(cnn_rule, cnn_params):
    return cnn_rule.init(jax.random.key(2), cnn_params)


# --- One hidden block with B = W_out^T is backprop -------------------------------------------


def test_equals_backprop_with_output_weights(one_hidden, draw_params, random_batch):
    params = draw_params(jax.eval_shape(one_hidden.init, KEY), seed=3)
    output_weight = _linear(params[1])["w"]
    state = DirectFeedbackAlignmentState(feedback=(output_weight.T,))
    grads, _, metrics = _jitted_rule(one_hidden).update(state, params, random_batch, KEY)
    expected_loss, expected_grads = _backprop(one_hidden)(params, random_batch)
    assert state.feedback[0].shape == (10, 32)
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-6)
    _assert_trees_close(grads, expected_grads)


def test_equals_backprop_under_vmap(one_hidden, draw_params, random_batch):
    shapes = jax.eval_shape(one_hidden.init, KEY)
    sets = [draw_params(shapes, seed=seed) for seed in (4, 5)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *sets)
    feedback = (jnp.swapaxes(_linear(stacked[1])["w"], 1, 2),)
    rule = rules.direct_feedback_alignment(one_hidden)
    grads, _, _ = jax.jit(jax.vmap(rule.update, in_axes=(0, 0, None, None)))(
        DirectFeedbackAlignmentState(feedback), stacked, random_batch, KEY
    )
    backprop = _backprop(one_hidden)
    for index, params in enumerate(sets):
        expected = backprop(params, random_batch)[1]
        _assert_trees_close(jax.tree.map(lambda leaf, i=index: leaf[i], grads), expected)


# --- Random feedback --------------------------------------------------------------------------


def test_differs_from_backprop_at_random_init(
    cnn_rule, cnn_params, cnn_state, cnn_backprop, random_batch
):
    grads, _, _ = cnn_rule.update(cnn_state, cnn_params, random_batch, KEY)
    cosines = _block_cosines(grads, cnn_backprop(cnn_params, random_batch)[1])
    for leaf in jax.tree.leaves(grads):
        assert np.any(np.asarray(leaf) != 0)
    assert cosines[0] < 0.99
    assert cosines[1] < 0.99
    assert cosines[2] == pytest.approx(1.0, abs=1e-6)


def test_output_block_is_backprop(cnn_rule, cnn_params, cnn_state, cnn_backprop, random_batch):
    grads, _, _ = cnn_rule.update(cnn_state, cnn_params, random_batch, KEY)
    expected = cnn_backprop(cnn_params, random_batch)[1]
    _assert_trees_close(grads[-1], expected[-1])


def test_state_is_fixed(cnn_rule, cnn_params, cnn_state, random_batch):
    _, new_state, _ = cnn_rule.update(cnn_state, cnn_params, random_batch, KEY)
    assert jax.tree.structure(new_state) == jax.tree.structure(cnn_state)
    for old, new in zip(cnn_state.feedback, new_state.feedback):
        np.testing.assert_array_equal(old, new)


def test_conv_blocks_get_local_vjp(cnn, cnn_rule, cnn_params, cnn_state, random_batch):
    # Each hidden block's direction is the VJP of that block alone, at its own input, with
    # the cotangent e @ B_l laid out in the row-major order of the block's output.
    @jax.jit
    def expected_directions(params, feedback, x, y):
        outputs = cnn.forward(params, x)
        error = jax.grad(losses.softmax_cross_entropy)(outputs[-1], y)
        inputs = [x, *outputs[:-1]]
        directions = []
        for block, block_params, block_input, output, matrix in zip(
            cnn.blocks, params, inputs, outputs, feedback
        ):
            _, vjp = jax.vjp(lambda p, b=block, x=block_input: b.apply(p, x), block_params)
            directions.append(vjp((error @ matrix).reshape(output.shape))[0])
        return directions

    grads, _, _ = cnn_rule.update(cnn_state, cnn_params, random_batch, KEY)
    expected = expected_directions(cnn_params, cnn_state.feedback, *random_batch)
    assert len(expected) == 2
    _assert_trees_close(grads[0], expected[0])
    _assert_trees_close(grads[1], expected[1])


def test_matches_hand_derivation(draw_params, random_batch):
    # h1 = tanh(x W1 + b1), h2 = tanh(h1 W2 + b2), z = h2 W3 + b3, e = dL/dz. DFA gives
    # block l the cotangent e B_l at its output, so delta_l = (e B_l) * (1 - h_l^2),
    # dW1 = x^T delta_1, dW2 = h1^T delta_2 (h1 held constant), dW3 = h2^T e.
    network = models.mlp((8, 8, 1), [16, 12], activation=nn.tanh)
    params = draw_params(jax.eval_shape(network.init, KEY), seed=7)
    rng = np.random.default_rng(8)
    feedback = (
        jnp.asarray(rng.normal(size=(10, 16)), jnp.float32),
        jnp.asarray(rng.normal(size=(10, 12)), jnp.float32),
    )
    grads, _, _ = _jitted_rule(network).update(
        DirectFeedbackAlignmentState(feedback), params, random_batch, KEY
    )

    (w1, b1), (w2, b2), (w3, b3) = [
        (np.float64(_linear(block)["w"]), np.float64(_linear(block)["b"])) for block in params
    ]
    b_1, b_2 = np.float64(feedback[0]), np.float64(feedback[1])
    x = np.float64(random_batch[0]).reshape(16, 64)
    targets = np.eye(10)[np.asarray(random_batch[1])]
    h1 = np.tanh(x @ w1 + b1)
    h2 = np.tanh(h1 @ w2 + b2)
    z = h2 @ w3 + b3
    probabilities = np.exp(z - z.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    error = (probabilities - targets) / len(x)
    delta_1 = (error @ b_1) * (1 - h1**2)
    delta_2 = (error @ b_2) * (1 - h2**2)

    expected = [(x.T @ delta_1, delta_1.sum(0)), (h1.T @ delta_2, delta_2.sum(0))]
    expected.append((h2.T @ error, error.sum(0)))
    for block, (weight, bias) in zip(grads, expected):
        np.testing.assert_allclose(_linear(block)["w"], weight, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(_linear(block)["b"], bias, rtol=1e-4, atol=1e-6)


# --- Feedback matrices ------------------------------------------------------------------------


def test_feedback_shapes(cnn, cnn_state):
    assert cnn.block_shapes == ((4, 4, 16), (2, 2, 32), (10,))
    assert [matrix.shape for matrix in cnn_state.feedback] == [(10, 256), (10, 128)]
    assert all(matrix.dtype == jnp.float32 for matrix in cnn_state.feedback)


def test_feedback_independent_per_block():
    network = models.mlp((8, 8, 1), [16, 16], activation=nn.tanh)
    state = rules.direct_feedback_alignment(network).init(KEY, None)
    first, second = (np.asarray(matrix) for matrix in state.feedback)
    assert first.shape == second.shape == (10, 16)
    assert not np.allclose(first, second)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.3


@pytest.mark.parametrize("index,size", [(0, 256), (1, 128)])
def test_default_feedback_distribution(cnn_state, index, size):
    # U[-a, a] with a = 1 / sqrt(n) has variance a^2 / 3 = 1 / (3 n).
    matrix = np.asarray(cnn_state.feedback[index], np.float64)
    bound = 1.0 / np.sqrt(size)
    assert np.abs(matrix).max() <= bound
    assert np.abs(matrix).max() > 0.98 * bound
    assert matrix.var() == pytest.approx(1.0 / (3 * size), rel=0.1)
    assert abs(matrix.mean()) < 0.1 * bound


def test_feedback_scale_multiplies(cnn, cnn_params, cnn_state):
    doubled = rules.direct_feedback_alignment(cnn, feedback_scale=2.0).init(
        jax.random.key(2), cnn_params
    )
    for plain, scaled in zip(cnn_state.feedback, doubled.feedback):
        np.testing.assert_allclose(scaled, 2.0 * plain, rtol=1e-6)


def test_feedback_init_by_name(cnn, cnn_params):
    state = rules.direct_feedback_alignment(cnn, feedback_init="normal").init(KEY, cnn_params)
    matrix = np.asarray(state.feedback[0])
    assert matrix.shape == (10, 256)
    assert matrix.std() == pytest.approx(0.01, rel=0.1)


def test_zero_feedback_stops_hidden_gradients(one_hidden, draw_params, random_batch):
    params = draw_params(jax.eval_shape(one_hidden.init, KEY), seed=3)
    rule = _jitted_rule(one_hidden, feedback_init="zeros")
    grads, _, _ = rule.update(rule.init(KEY, params), params, random_batch, KEY)
    expected = _backprop(one_hidden)(params, random_batch)[1]
    assert not np.any(np.asarray(_linear(grads[0])["w"]))
    assert not np.any(np.asarray(_linear(grads[0])["b"]))
    _assert_trees_close(grads[1], expected[1])


@pytest.mark.parametrize("scale", [0, -0.5, None])
def test_bad_feedback_scale_raises(one_hidden, scale):
    with pytest.raises(ValueError, match="feedback_scale must be a positive number"):
        rules.direct_feedback_alignment(one_hidden, feedback_scale=scale)


def test_bad_feedback_init_raises(one_hidden):
    with pytest.raises(ValueError, match="unknown initializer 'random'"):
        rules.direct_feedback_alignment(one_hidden, feedback_init="random")
