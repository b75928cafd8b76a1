"""Feedback alignment against backprop (B = W), a hand-derived MLP and its options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import losses, models, nn, rules
from bpalt.rules.feedback_alignment import FeedbackAlignmentState

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


def _backprop_grad(network):
    backprop = _backprop(network)
    return lambda params, batch: backprop(params, batch)[1]


@pytest.fixture(scope="module")
def cnn():
    return models.digits_cnn()


@pytest.fixture(scope="module")
def cnn_params(cnn):
    # Eager init: jax.random compiles once per shape, and the rule's init reuses those
    # compiled draws, where each jitted init would compile them all again.
    return cnn.init(jax.random.key(1))


@pytest.fixture(scope="module")
def cnn_backprop(cnn):
    return _backprop(cnn)


@pytest.fixture(scope="module")
def mlp():
    return models.mlp((8, 8, 1), [24, 16], activation=nn.tanh)


@pytest.fixture(scope="module")
def mlp_params(mlp, draw_params):
    return draw_params(jax.eval_shape(mlp.init, KEY), seed=2)


@pytest.fixture(scope="module")
def cnn_rule(cnn):
    rule = rules.feedback_alignment(cnn)
    return rule._replace(update=jax.jit(rule.update))


# --- With B = W, feedback alignment is backprop ---------------------------------------------


@pytest.fixture(scope="module")
def mlp_rule(mlp):
    rule = rules.feedback_alignment(mlp)
    return rule._replace(update=jax.jit(rule.update))


@pytest.fixture(scope="module")
def mlp_backprop(mlp):
    return _backprop(mlp)


@pytest.fixture(scope="module")
def small_backprop(small_cnn):
    return _backprop_grad(small_cnn)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_equals_backprop_with_weights_as_feedback(model, request, random_batch):
    params = request.getfixturevalue(f"{model}_params")
    rule = request.getfixturevalue(f"{model}_rule")
    state = FeedbackAlignmentState(feedback=params)
    grads, _, metrics = rule.update(state, params, random_batch, KEY)
    expected_loss, expected_grads = request.getfixturevalue(f"{model}_backprop")(
        params, random_batch
    )
    _assert_trees_close(grads, expected_grads)
    assert float(metrics["loss"]) == pytest.approx(float(expected_loss), rel=1e-6)


def test_equals_backprop_from_rule_state(cnn_rule, cnn_params, cnn_backprop, random_batch):
    state = cnn_rule.init(jax.random.key(3), cnn_params)
    state = state._replace(feedback=cnn_params)
    grads, _, _ = cnn_rule.update(state, cnn_params, random_batch, KEY)
    _assert_trees_close(grads, cnn_backprop(cnn_params, random_batch)[1])


def _index(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def test_equals_backprop_under_vmap_over_params(
    small_cnn, small_backprop, draw_params, random_batch
):
    shapes = jax.eval_shape(small_cnn.init, KEY)
    sets = [draw_params(shapes, seed=seed) for seed in (5, 6, 7)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *sets)
    rule = rules.feedback_alignment(small_cnn)
    grads, _, _ = jax.jit(jax.vmap(rule.update, in_axes=(0, 0, None, None)))(
        FeedbackAlignmentState(feedback=stacked), stacked, random_batch, KEY
    )
    for index, params in enumerate(sets):
        _assert_trees_close(_index(grads, index), small_backprop(params, random_batch))


def test_equals_backprop_under_vmap_over_batches(
    small_cnn, small_backprop, draw_params, random_batch
):
    params = draw_params(jax.eval_shape(small_cnn.init, KEY), seed=5)
    x, y = random_batch
    batches = (x.reshape(4, 4, 8, 8, 1), y.reshape(4, 4))
    rule = rules.feedback_alignment(small_cnn)
    grads, _, metrics = jax.jit(jax.vmap(rule.update, in_axes=(None, None, 0, None)))(
        FeedbackAlignmentState(feedback=params), params, batches, KEY
    )
    assert metrics["loss"].shape == (4,)
    for index in range(4):
        expected = small_backprop(params, _index(batches, index))
        _assert_trees_close(_index(grads, index), expected)


def test_equals_backprop_inside_scan(small_cnn, draw_params, random_batch):
    # Two SGD steps whose feedback tracks the current weights follow backprop's path.
    params = draw_params(jax.eval_shape(small_cnn.init, KEY), seed=5)
    x, y = random_batch
    batches = (x.reshape(2, 8, 8, 8, 1), y.reshape(2, 8))
    rule = rules.feedback_alignment(small_cnn)

    def loss(params, batch):
        return losses.softmax_cross_entropy(small_cnn.apply(params, batch[0]), batch[1])

    def fa_step(params, batch):
        grads, _, _ = rule.update(FeedbackAlignmentState(feedback=params), params, batch, KEY)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), None

    def bp_step(params, batch):
        grads = jax.grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), None

    fa_params, _ = jax.jit(lambda p: lax.scan(fa_step, p, batches))(params)
    bp_params, _ = jax.jit(lambda p: lax.scan(bp_step, p, batches))(params)
    _assert_trees_close(fa_params, bp_params, atol=1e-5)
    assert not np.allclose(fa_params[0][0]["w"], params[0][0]["w"])


# --- With random feedback -------------------------------------------------------------------


def test_differs_from_backprop_at_random_init(cnn_rule, cnn_params, cnn_backprop, random_batch):
    state = cnn_rule.init(jax.random.key(3), cnn_params)
    grads, _, _ = cnn_rule.update(state, cnn_params, random_batch, KEY)
    cosines = _block_cosines(grads, cnn_backprop(cnn_params, random_batch)[1])
    for leaf in jax.tree.leaves(grads):
        assert np.any(np.asarray(leaf) != 0)
    assert cosines[0] < 0.99
    assert cosines[1] < 0.99
    assert cosines[2] == pytest.approx(1.0, abs=1e-6)


def test_last_layer_gradient_is_backprop(cnn_rule, cnn_params, cnn_backprop, random_batch):
    first, second = (
        cnn_rule.update(cnn_rule.init(key, cnn_params), cnn_params, random_batch, KEY)[0]
        for key in (jax.random.key(3), jax.random.key(4))
    )
    expected = cnn_backprop(cnn_params, random_batch)[1]
    # The output layer's gradient reads no feedback weights.
    np.testing.assert_array_equal(first[-1][1]["w"], second[-1][1]["w"])
    np.testing.assert_array_equal(first[-1][1]["b"], second[-1][1]["b"])
    np.testing.assert_allclose(first[-1][1]["w"], expected[-1][1]["w"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(first[-1][1]["b"], expected[-1][1]["b"], rtol=RTOL, atol=ATOL)
    assert not np.allclose(first[0][0]["w"], second[0][0]["w"], rtol=0.01)


def test_matches_hand_derivation(draw_params, random_batch):
    # One hidden tanh layer: h = tanh(x W1 + b1), z = h W2 + b2, e = dL/dz. Feedback
    # alignment sends e B2^T instead of e W2^T, so dW1 = x^T ((e B2^T) * (1 - h^2)).
    network = models.mlp((8, 8, 1), [12], activation=nn.tanh)
    shapes = jax.eval_shape(network.init, KEY)
    params, feedback = draw_params(shapes, seed=11), draw_params(shapes, seed=12)
    grads, _, _ = jax.jit(rules.feedback_alignment(network).update)(
        FeedbackAlignmentState(feedback=feedback), params, random_batch, KEY
    )

    (w1, b1), (w2, b2) = [
        (np.float64(_linear(block)["w"]), np.float64(_linear(block)["b"])) for block in params
    ]
    feedback_w2 = np.float64(_linear(feedback[1])["w"])
    x = np.float64(random_batch[0]).reshape(16, 64)
    targets = np.eye(10)[np.asarray(random_batch[1])]
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    probabilities = np.exp(z - z.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    error = (probabilities - targets) / len(x)
    delta = (error @ feedback_w2.T) * (1 - h**2)

    np.testing.assert_allclose(_linear(grads[1])["w"], h.T @ error, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_linear(grads[1])["b"], error.sum(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_linear(grads[0])["w"], x.T @ delta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_linear(grads[0])["b"], delta.sum(0), rtol=1e-4, atol=1e-6)


def test_state_is_fixed(cnn_rule, cnn_params, random_batch):
    state = cnn_rule.init(jax.random.key(3), cnn_params)
    _, new_state, _ = cnn_rule.update(state, cnn_params, random_batch, KEY)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
        np.testing.assert_array_equal(old, new)


# --- Options --------------------------------------------------------------------------------


def test_default_feedback_uses_layer_initializers(cnn, cnn_rule, cnn_params):
    state = cnn_rule.init(jax.random.key(3), cnn_params)
    assert jax.tree.structure(state.feedback) == jax.tree.structure(cnn_params)
    _assert_trees_close(state.feedback, cnn.init(jax.random.key(3)), rtol=0, atol=0)


def test_feedback_is_independent_of_params(cnn_rule, cnn_params):
    state = cnn_rule.init(jax.random.key(4), cnn_params)
    assert not np.allclose(_linear(state.feedback[1])["w"], _linear(cnn_params[1])["w"])


def test_feedback_scale_multiplies_weights(mlp, mlp_params):
    key = jax.random.key(5)
    plain = rules.feedback_alignment(mlp).init(key, mlp_params).feedback
    doubled = rules.feedback_alignment(mlp, feedback_scale=2.0).init(key, mlp_params).feedback
    for block_plain, block_doubled in zip(plain, doubled):
        weight_plain, weight_doubled = _linear(block_plain)["w"], _linear(block_doubled)["w"]
        np.testing.assert_allclose(weight_doubled, 2.0 * weight_plain, rtol=1e-6)
        assert np.any(np.asarray(weight_plain) != 0)


def test_feedback_init_by_name(mlp, mlp_params):
    state = rules.feedback_alignment(mlp, feedback_init="xavier_uniform").init(KEY, mlp_params)
    weight = np.asarray(_linear(state.feedback[0])["w"])
    bound = np.sqrt(6.0 / (64 + 24))
    assert weight.shape == (64, 24)
    assert np.abs(weight).max() <= bound
    assert np.abs(weight).max() > 0.9 * bound
    # Bias leaves are copied from params, never drawn, because they only keep the structure.
    np.testing.assert_array_equal(_linear(state.feedback[0])["b"], _linear(mlp_params[0])["b"])


def test_feedback_init_function_and_scale(mlp, mlp_params):
    rule = rules.feedback_alignment(
        mlp, feedback_init=nn.initializers.constant(0.5), feedback_scale=3.0
    )
    state = rule.init(KEY, mlp_params)
    for block in state.feedback:
        weight = _linear(block)["w"]
        np.testing.assert_array_equal(weight, np.full(weight.shape, 1.5, np.float32))


def test_zero_feedback_stops_hidden_gradients(mlp, mlp_params, mlp_backprop, random_batch):
    rule = rules.feedback_alignment(mlp, feedback_init="zeros")
    state = rule.init(KEY, mlp_params)
    grads, _, _ = jax.jit(rule.update)(state, mlp_params, random_batch, KEY)
    expected = mlp_backprop(mlp_params, random_batch)[1]
    # With B = 0 no error reaches the hidden layers, so only the output layer learns.
    assert not np.any(np.asarray(_linear(grads[0])["w"]))
    assert not np.any(np.asarray(_linear(grads[1])["w"]))
    np.testing.assert_allclose(
        _linear(grads[2])["w"], _linear(expected[2])["w"], rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("scale", [0.0, -1.0, "2", float("inf")])
def test_bad_feedback_scale_raises(mlp, scale):
    expected = "finite positive" if scale == float("inf") else "positive"
    with pytest.raises(ValueError, match=f"feedback_scale must be a {expected} number"):
        rules.feedback_alignment(mlp, feedback_scale=scale)


def test_numpy_scalar_hyperparameter_accepted(mlp):
    rule = rules.feedback_alignment(mlp, feedback_scale=np.float32(0.5))
    state = rule.init(jax.random.key(0), mlp.init(jax.random.key(1)))
    reference = rules.feedback_alignment(mlp, feedback_scale=0.5)
    expected = reference.init(jax.random.key(0), mlp.init(jax.random.key(1)))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_bad_feedback_init_raises(mlp):
    with pytest.raises(ValueError, match="unknown initializer 'glorot'"):
        rules.feedback_alignment(mlp, feedback_init="glorot")
