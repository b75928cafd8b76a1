"""Diagnostics against hand computations on a tiny tanh MLP, and the untouched training state."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import diagnostics, losses, models, nn, rules, train
from bpalt.rules.direct_feedback_alignment import DirectFeedbackAlignmentState
from bpalt.rules.feedback_alignment import FeedbackAlignmentState

# Blocks: block0 = flatten, dense 5, tanh; block1 = dense 4, tanh; block2 = dense 3.
LAYERS = ("block0.1", "block1.0", "block2.0")
BLOCKS = ("block0", "block1", "block2")


@pytest.fixture(scope="module")
def network():
    return models.mlp((2, 3, 1), [5, 4], num_classes=3, activation=nn.tanh)


@pytest.fixture(scope="module")
def params(network, draw_params):
    return draw_params(jax.eval_shape(network.init, jax.random.key(0)), seed=7)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, 2, 3, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
    return x, y


def _dense_layers(params):
    """The three dense layers' (w, b) in forward order, as float64 NumPy arrays."""
    layers = [params[0][1], params[1][0], params[2][0]]
    return [(np.asarray(p["w"], np.float64), np.asarray(p["b"], np.float64)) for p in layers]


def _numpy_gradient(params, batch):
    """Softmax cross-entropy gradient of the tiny tanh MLP, derived by hand in NumPy."""
    (w0, b0), (w1, b1), (w2, b2) = _dense_layers(params)
    x = np.asarray(batch[0], np.float64).reshape(len(batch[1]), -1)
    y = np.eye(3)[np.asarray(batch[1])]

    h0 = np.tanh(x @ w0 + b0)
    h1 = np.tanh(h0 @ w1 + b1)
    logits = h1 @ w2 + b2
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)

    delta2 = (probabilities - y) / len(y)
    delta1 = (delta2 @ w2.T) * (1 - h1**2)
    delta0 = (delta1 @ w1.T) * (1 - h0**2)
    return [
        (x.T @ delta0, delta0.sum(0)),
        (h0.T @ delta1, delta1.sum(0)),
        (h1.T @ delta2, delta2.sum(0)),
    ]


def _diagnose(rule, network):
    """The jitted diagnostics of ``rule``: one compilation instead of one per eager op."""
    return jax.jit(diagnostics.make_diagnose(rule, network, losses.get("cross_entropy")))


def _random_state(name, params):
    """A rule state with NumPy-drawn feedback: no ``jax.random`` compilation per shape."""
    rng = np.random.default_rng(11)
    if name == "fa":
        feedback = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), params)
        return FeedbackAlignmentState(jax.tree.map(lambda leaf: leaf.astype(jnp.float32), feedback))
    matrices = (rng.uniform(-0.5, 0.5, (3, 5)), rng.uniform(-0.5, 0.5, (3, 4)))
    return DirectFeedbackAlignmentState(tuple(jnp.asarray(m, jnp.float32) for m in matrices))


def _scaled_weights(params, factor):
    return jax.tree.map(lambda leaf: factor * leaf, params)


@pytest.fixture(scope="module")
def backprop_metrics(network, params, batch):
    return _diagnose(rules.backprop(network), network)((), params, batch, jax.random.key(0))


@pytest.fixture(scope="module")
def fa_diagnose(network):
    return _diagnose(rules.feedback_alignment(network), network)


def test_grad_norm_matches_numpy_per_layer(backprop_metrics, params, batch):
    expected = {
        f"grad_norm/{name}": np.linalg.norm(np.concatenate([w.ravel(), b.ravel()]))
        for name, (w, b) in zip(LAYERS, _numpy_gradient(params, batch))
    }
    actual = {k: float(v) for k, v in backprop_metrics.items() if k.startswith("grad_norm/")}
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name] == pytest.approx(value, rel=1e-4)


def test_layer_names_follow_documented_scheme():
    cnn = models.digits_cnn(channels=(2, 3))
    assert diagnostics.layer_names(jax.eval_shape(cnn.init, jax.random.key(0))) == [
        "block0.0",
        "block1.0",
        "block2.1",
    ]
    single = nn.Network([nn.serial(nn.flatten, nn.dense(3)), nn.dense(2)], (4,))
    assert diagnostics.layer_names(jax.eval_shape(single.init, jax.random.key(0))) == [
        "block0.1",
        "block1",
    ]


def test_grad_norm_exact_below_float32_square_underflow():
    tiny = {"w": jnp.full((4, 3), 1e-25, jnp.float32)}

    norms = diagnostics.grad_norms((tiny,))

    assert float(norms["grad_norm/block0"]) == pytest.approx(math.sqrt(12) * 1e-25, rel=1e-5)


def test_backprop_cosine_and_ratio_are_one(backprop_metrics):
    for block in BLOCKS:
        assert float(backprop_metrics[f"update_cosine/{block}"]) == pytest.approx(1.0, abs=1e-5)
        assert float(backprop_metrics[f"update_norm_ratio/{block}"]) == pytest.approx(1.0, abs=1e-5)
    assert not any(k.startswith("weight_angle_deg/") for k in backprop_metrics)


def test_alignment_metrics_hand_computed():
    direction = ({"w": jnp.array([[3.0, 4.0]])}, {"w": jnp.zeros((1, 2))}, ())
    reference = ({"w": jnp.array([[4.0, 3.0]])}, {"w": jnp.array([[1.0, 0.0]])}, ())

    metrics = diagnostics.alignment_metrics(direction, reference, BLOCKS)

    assert set(metrics) == {
        "update_cosine/block0",
        "update_norm_ratio/block0",
        "update_cosine/block1",
        "update_norm_ratio/block1",
    }
    assert float(metrics["update_cosine/block0"]) == pytest.approx(24 / 25)
    assert float(metrics["update_norm_ratio/block0"]) == pytest.approx(1.0)
    assert float(metrics["update_cosine/block1"]) == 0.0
    assert float(metrics["update_norm_ratio/block1"]) == 0.0


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_fa_scaled_feedback_ratio_powers(fa_diagnose, params, batch, scale):
    # With B = scale * W the error crosses k feedback layers on its way to block 2 - k, so
    # that block's direction is scale**k times the backprop gradient: same direction, norm
    # ratio scale**k, and every used feedback matrix at 0 degrees from its weights.
    state = FeedbackAlignmentState(_scaled_weights(params, scale))

    metrics = fa_diagnose(state, params, batch, jax.random.key(0))

    for crossings, block in zip((2, 1, 0), BLOCKS):
        assert float(metrics[f"update_cosine/{block}"]) == pytest.approx(1.0, abs=1e-5)
        assert float(metrics[f"update_norm_ratio/{block}"]) == pytest.approx(
            scale**crossings, rel=1e-4
        )
    assert float(metrics["weight_angle_deg/block1"]) == pytest.approx(0.0, abs=0.05)
    assert float(metrics["weight_angle_deg/block2"]) == pytest.approx(0.0, abs=0.05)


def test_weight_angle_skips_first_linear_layer(network, params):
    metrics = diagnostics.weight_angles(params, params, BLOCKS)

    assert set(metrics) == {"weight_angle_deg/block1", "weight_angle_deg/block2"}


def test_weight_angle_hand_computed_pair(network, params):
    # Feedback = W + U with U orthogonal to W: the angle is arctan(||U|| / ||W||). Block 2's
    # feedback is -W: 180 degrees.
    rng = np.random.default_rng(5)
    w1 = np.asarray(params[1][0]["w"], np.float64)
    u = rng.normal(size=w1.shape)
    u -= (u * w1).sum() / (w1 * w1).sum() * w1
    u *= 0.7 * np.linalg.norm(w1) / np.linalg.norm(u)
    feedback = (
        params[0],
        ({"w": jnp.asarray(w1 + u, jnp.float32), "b": params[1][0]["b"]}, ()),
        ({"w": -params[2][0]["w"], "b": params[2][0]["b"]},),
    )

    metrics = diagnostics.weight_angles(params, feedback, BLOCKS)

    assert float(metrics["weight_angle_deg/block1"]) == pytest.approx(
        math.degrees(math.atan(0.7)), abs=0.01
    )
    assert float(metrics["weight_angle_deg/block2"]) == pytest.approx(180.0, abs=0.05)


def test_dfa_state_gives_no_weight_angle(network, params, batch):
    rule = rules.direct_feedback_alignment(network)
    state = _random_state("dfa", params)

    metrics = _diagnose(rule, network)(state, params, batch, jax.random.key(0))

    assert not any(k.startswith("weight_angle_deg/") for k in metrics)
    assert float(metrics["update_cosine/block2"]) == pytest.approx(1.0, abs=1e-5)


def _host_copy(tree):
    return [np.array(leaf, copy=True) for leaf in jax.tree.leaves(tree)]


def _assert_bitwise_equal(before, tree):
    after = jax.tree.leaves(tree)
    assert len(before) == len(after)
    for old, new in zip(before, after):
        assert np.array_equal(old, np.asarray(new))


def _jitted_update(rule):
    return rule._replace(update=jax.jit(rule.update))


@pytest.mark.parametrize(("name", "jit_rule"), [("fa", False), ("fa", True), ("dfa", True)])
def test_diagnose_leaves_state_bitwise_unchanged(network, params, batch, name, jit_rule):
    rule = rules.get(name, network)
    if jit_rule:
        rule = _jitted_update(rule)
    state = _random_state(name, params)
    params_before, state_before = _host_copy(params), _host_copy(state)
    diagnose = _diagnose(rule, network)

    diagnose(state, params, batch, jax.random.key(2))
    jax.block_until_ready((params, state))

    _assert_bitwise_equal(params_before, params)
    _assert_bitwise_equal(state_before, state)


def test_diagnose_between_steps_keeps_trajectory(network, params, batch):
    rule = _jitted_update(rules.feedback_alignment(network))
    optimizer = optax.sgd(0.1, momentum=0.9)
    step = train.make_train_step(rule, optimizer)
    diagnose = _diagnose(rule, network)
    feedback = _scaled_weights(params, -0.5)

    def run(with_diagnostics):
        current = (params, FeedbackAlignmentState(feedback), optimizer.init(params))
        for index in range(3):
            if with_diagnostics:
                diagnose(current[1], current[0], batch, jax.random.key(index))
            current = step(*current, batch, jax.random.key(index))[:3]
        return current

    plain, diagnosed = run(False), run(True)

    _assert_bitwise_equal(_host_copy(plain), diagnosed)


def test_mean_update_cosine():
    metrics = {"update_cosine/block0": 0.5, "update_cosine/block1": 1.0, "loss": 9.0}

    assert diagnostics.mean_update_cosine(metrics) == 0.75
    assert math.isnan(diagnostics.mean_update_cosine({"loss": 1.0}))
