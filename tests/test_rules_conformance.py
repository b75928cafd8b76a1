"""One suite that every registered update rule passes, built with its default hyperparameters.

Rules registered later are covered automatically: the cases come from ``rules.names()``.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import losses, models, rules, train

NAMES = rules.names()
BATCH = 32


def _signature(tree):
    """Structure, shapes and dtypes of a pytree, comparable with ``==``."""
    return jax.tree.structure(tree), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]


def _host_values(leaf):
    """A leaf as a NumPy array; PRNG key arrays become their raw key data."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def _float_leaves(tree):
    return [
        np.asarray(leaf)
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]


@pytest.fixture(scope="module")
def network():
    return models.digits_cnn(channels=(4, 8))


@pytest.fixture(scope="module")
def params(network):
    return network.init(jax.random.key(0))


@pytest.fixture(scope="module")
def batches(digits):
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    return (x[:BATCH], y[:BATCH]), (x[BATCH : 2 * BATCH], y[BATCH : 2 * BATCH])


@pytest.fixture(scope="module", params=NAMES)
def case(request, network, params, batches):
    """One rule's state and two jitted updates on different batches of the same shape."""
    rule = rules.get(request.param, network)
    state = rule.init(jax.random.key(1), params)
    traces = []

    def counted_update(state, params, batch, key):
        traces.append(request.param)
        return rule.update(state, params, batch, key)

    update = jax.jit(counted_update)
    first = update(state, params, batches[0], jax.random.key(2))
    second = update(first[1], params, batches[1], jax.random.key(3))
    return SimpleNamespace(
        name=request.param,
        rule=rule,
        state=state,
        update=update,
        first=first,
        second=second,
        traces=traces,
    )


def test_rule_name(case):
    assert case.rule.name == case.name


def test_traces_once(case):
    assert case.traces == [case.name]


def test_direction_matches_params(case, params):
    for grads, _, _ in (case.first, case.second):
        assert _signature(grads) == _signature(params)


def test_direction_not_all_zero(case):
    grads = case.first[0]
    assert any(np.any(leaf != 0) for leaf in _float_leaves(grads))


def test_everything_finite(case):
    for grads, state, metrics in (case.first, case.second):
        for leaf in _float_leaves((grads, state, metrics)):
            assert np.all(np.isfinite(leaf))


def test_metrics_flat_scalars_with_loss(case):
    for _, _, metrics in (case.first, case.second):
        assert isinstance(metrics, dict)
        assert "loss" in metrics
        for key, value in metrics.items():
            assert isinstance(key, str)
            assert jnp.shape(value) == ()


def test_state_structure_stable(case):
    assert _signature(case.first[1]) == _signature(case.state)
    assert _signature(case.second[1]) == _signature(case.state)


def test_update_is_deterministic(case, params, batches):
    again = case.update(case.state, params, batches[0], jax.random.key(2))
    for expected, actual in zip(jax.tree.leaves(case.first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(_host_values(actual), _host_values(expected))


def test_predict_shape(case, params, batches):
    logits = jax.jit(case.rule.predict)(case.state, params, batches[0][0])
    assert logits.shape == (BATCH, 10)
    assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.training
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(name, network, params, batches):
    # 40 steps on one fixed batch of 32 digits. Every rule should cut the loss by 10 % at
    # least; bp, fa, dfa, es and ntk cut it by 40 % to 95 %.
    defaults = rules.training_defaults(name)
    optimizer = getattr(optax, str(defaults.get("optimizer", "adam")))(
        defaults.get("learning_rate", 1e-2)
    )
    rule = rules.get(name, network)
    x, y = batches[0]
    step = train.make_train_step(rule, optimizer)
    loss = jax.jit(
        lambda state, params: losses.softmax_cross_entropy(rule.predict(state, params, x), y)
    )

    state = rule.init(jax.random.key(1), params)
    start = float(loss(state, params))
    trained, opt_state = params, optimizer.init(params)
    for index in range(40):
        key = jax.random.fold_in(jax.random.key(2), index)
        trained, state, opt_state, metrics = step(trained, state, opt_state, (x, y), key)
    end = float(loss(state, trained))

    assert np.isfinite(float(metrics["loss"]))
    assert np.isfinite(end)
    assert end < 0.9 * start


# --- The registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_update_rejects_batch_not_a_pair(name, network, params, batches):
    rule = rules.get(name, network)
    state = rule.init(jax.random.key(0), params)
    x, y = batches[0]
    for batch, described in (
        (x[:2], r"an array of shape \(2, 8, 8, 1\)"),
        ((x, y, y), "a tuple of 3 items"),
    ):
        with pytest.raises(ValueError, match=rf"batch must be a pair \(x, y\).*got {described}"):
            jax.jit(rule.update)(state, params, batch, jax.random.key(1))


@pytest.mark.parametrize("name", NAMES)
def test_update_checks_inputs_and_label_count(name, network, params, batches):
    rule = rules.get(name, network)
    state = rule.init(jax.random.key(0), params)
    x, y = batches[0]
    cases = (
        ((np.asarray(x).tolist(), y), "got list; convert it with jnp.asarray"),
        ((x[:8], y[:4]), r"invalid batch: 8 inputs but labels of shape \(4,\)"),
    )
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            rule.update(state, params, batch, jax.random.key(1))


def test_registry_has_core_rules():
    assert {"bp", "fa", "dfa"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_training_defaults_keys(name):
    assert set(rules.training_defaults(name)) <= {
        "epochs",
        "batch_size",
        "optimizer",
        "learning_rate",
    }


def test_get_unknown_rule_raises(network):
    with pytest.raises(ValueError, match="unknown rule 'sgd'; accepted: .*bp"):
        rules.get("sgd", network)


def test_get_unknown_hyperparameter_raises(network):
    with pytest.raises(ValueError, match="unknown hyperparameter.*feedback_size.*'fa'"):
        rules.get("fa", network, feedback_size=3)


def test_get_passes_hyperparameters(network, params):
    state = rules.get("fa", network, feedback_init="zeros").init(jax.random.key(1), params)
    assert not np.any(np.asarray(state.feedback[0][0]["w"]))


def test_get_accepts_loss_name(network, params, batches):
    rule = rules.get("bp", network, "mse")
    _, _, metrics = jax.jit(rule.update)(rule.init(None, params), params, batches[0], None)
    logits = network.apply(params, batches[0][0])
    expected = losses.mean_squared_error(logits, batches[0][1])
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("network", ["digits_cnn", None])
def test_network_that_is_not_a_network_rejected(network):
    with pytest.raises(TypeError, match=r"network must be a bpalt.nn.Network, got"):
        rules.get("bp", network)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_rejects_non_network(name):
    with pytest.raises(TypeError, match=r"network must be a bpalt.nn.Network, got str"):
        rules.constructor(name)("digits_cnn")


def test_constructor_rejects_unknown_hyperparameter(network):
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) bogus for rule 'fa'; "
                       r"accepted: feedback_init, feedback_scale"):
        rules.feedback_alignment(network, bogus=1)


def test_get_loss_none_is_default(network, params, batches):
    rule = rules.get("bp", network, None)
    _, _, metrics = jax.jit(rule.update)(rule.init(None, params), params, batches[0], None)
    expected = losses.softmax_cross_entropy(network.apply(params, batches[0][0]), batches[0][1])
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_held_out_evaluator_checks_arguments(network):
    with pytest.raises(TypeError, match="network must be a bpalt.nn.Network"):
        rules.held_out_evaluator("bp", None)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        rules.held_out_evaluator("bp", network, foo=1)


def test_user_rule_plain_hyperparameters(network, params, batches, monkeypatch):
    from bpalt.rules import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TRAINING", dict(registry._TRAINING))
    scales = []

    @rules.register("scaled_bp_for_test")
    def scaled_bp(network, loss=losses.softmax_cross_entropy, scale=1.0, **options):
        scales.append((scale, options))
        return rules.backprop(network, loss)

    scaled_bp(network, "mse", 2.0)
    scaled_bp(network, scale=3.0, extra=True)
    rules.get("scaled_bp_for_test", network, scale=4.0)
    assert scales == [(2.0, {}), (3.0, {"extra": True}), (4.0, {})]
    assert rules.hyperparameters("scaled_bp_for_test") == {"scale": 1.0}
    with pytest.raises(TypeError, match="network must be a bpalt.nn.Network"):
        scaled_bp("network")


def test_constructor_resolves_loss_name(network, params, batches):
    rule = rules.backprop(network, "mse")
    _, _, metrics = jax.jit(rule.update)(rule.init(None, params), params, batches[0], None)
    expected = losses.mean_squared_error(network.apply(params, batches[0][0]), batches[0][1])
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        rules.feedback_alignment(network, "hinge")


# --- Hyperparameter checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [3.4028235e38, np.float32(3e38), np.float64(1.5), 7, np.int64(2**40)],
    ids=["float32 max", "float32 scalar", "float64 scalar", "int", "large int64"],
)
def test_check_positive_accepts_float32_range(value):
    rules.base.check_positive("sigma", value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3.4028236e38, "sigma must be at most 3.4028235e\\+38, float32's largest value"),
        (10**400, "sigma must be at most 3.4028235e\\+38"),
        (np.float64(1e39), "sigma must be at most 3.4028235e\\+38"),
        (np.float32(np.inf), "sigma must be a finite positive number"),
        (float("nan"), "sigma must be a positive number, got nan"),
    ],
    ids=["above float32", "huge int", "float64 scalar", "float32 inf", "nan"],
)
def test_check_positive_rejects_beyond_float32(value, message):
    with pytest.raises(ValueError, match=message):
        rules.base.check_positive("sigma", value)


def test_check_positive_integer_limit():
    rules.base.check_positive("population", 2**31 - 1, integer=True)

    with pytest.raises(ValueError, match="population must be at most 2147483647"):
        rules.base.check_positive("population", 2**31, integer=True)
