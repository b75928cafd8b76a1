"""The linearised network, the empirical NTK and the closed-form MSE training, each checked
against an independent computation: explicit Jacobians from ``jax.jacrev``, NumPy linear
algebra, and gradient descent run step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpalt import losses, models, nn, ntk, rules

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def network():
    return models.digits_cnn()


@pytest.fixture(scope="module")
def params(network):
    return network.init(jax.random.key(0))


@pytest.fixture(scope="module")
def small_network():
    """A one-hidden-layer MLP: compiles faster where the architecture does not matter."""
    return models.mlp((8, 8, 1), [16])


def _inputs(key, n):
    # NumPy draws: jax.random compiled anew for every shape.
    return jnp.asarray(np.random.default_rng(key).uniform(size=(n, 8, 8, 1)), jnp.float32)


def _jacobian(network, params, x):
    """Reference Jacobian (n, C, P) of the whole batch by ``jax.jacrev``."""
    jacobian = jax.jit(jax.jacrev(network.apply))(params, x)
    n, c = x.shape[0], NUM_CLASSES
    return jnp.concatenate([leaf.reshape(n, c, -1) for leaf in jax.tree.leaves(jacobian)], -1)


def _flat(tree):
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree.leaves(tree)])


def _perturbed(params, key, scale):
    rng = np.random.default_rng(key)
    return jax.tree.map(
        lambda leaf: leaf + scale * rng.standard_normal(leaf.shape, np.float32), params
    )


# --- The linearised network -----------------------------------------------------------------


def test_linearized_equals_network_at_theta0(network, params):
    x = _inputs(1, 6)
    f_lin = ntk.linearize(network, params)
    np.testing.assert_allclose(f_lin(params, x), network.apply(params, x), rtol=1e-6, atol=1e-6)


def test_linearized_is_taylor_expansion(network, params):
    x = _inputs(2, 5)
    theta = _perturbed(params, 3, 0.1)
    jacobian = _jacobian(network, params, x)

    expected = network.apply(params, x) + jacobian @ (_flat(theta) - _flat(params))
    actual = ntk.linearize(network, params)(theta, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_linearized_is_linear_in_params(network, params):
    x = _inputs(4, 5)
    f_lin = ntk.linearize(network, params)
    direction1, direction2 = _perturbed(params, 5, 0.3), _perturbed(params, 6, 0.3)
    step1 = jax.tree.map(jnp.subtract, direction1, params)
    step2 = jax.tree.map(jnp.subtract, direction2, params)

    combined = jax.tree.map(lambda p, a, b: p + 2.5 * a - 1.5 * b, params, step1, step2)
    base = f_lin(params, x)
    expected = base + 2.5 * (f_lin(direction1, x) - base) - 1.5 * (f_lin(direction2, x) - base)
    np.testing.assert_allclose(f_lin(combined, x), expected, rtol=1e-4, atol=1e-4)


def test_ntk_rule_grads_are_linearised_gradient(network, params):
    x, y = _inputs(7, 8), jnp.arange(8) % NUM_CLASSES
    rule = rules.get("ntk", network)
    state = rule.init(jax.random.key(0), params)
    theta = _perturbed(params, 8, 0.05)

    grads, new_state, metrics = jax.jit(rule.update)(state, theta, (x, y), jax.random.key(1))

    jacobian = _jacobian(network, params, x)
    logits = network.apply(params, x) + jacobian @ (_flat(theta) - _flat(params))
    loss_value, output_grad = jax.value_and_grad(losses.softmax_cross_entropy)(logits, y)
    expected = jnp.einsum("ic,icp->p", output_grad, jacobian)
    np.testing.assert_allclose(_flat(grads), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss_value, rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    np.testing.assert_array_equal(_flat(new_state.params0), _flat(params))


def test_ntk_rule_predicts_with_linearised_network(network, params):
    x = _inputs(9, 4)
    rule = rules.get("ntk", network)
    state = rule.init(jax.random.key(0), params)
    theta = _perturbed(params, 10, 0.2)

    expected = ntk.linearize(network, params)(theta, x)
    np.testing.assert_allclose(rule.predict(state, theta, x), expected, rtol=1e-6)
    assert not np.allclose(rule.predict(state, theta, x), network.apply(theta, x), atol=1e-3)


# --- The empirical NTK ------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_kernel(network, params):
    """Full NTK (n1, n2, C, C) of 5 x 7 inputs from explicit ``jax.jacrev`` Jacobians."""
    j1, j2 = _jacobian(network, params, _inputs(11, 5)), _jacobian(network, params, _inputs(12, 7))
    return jnp.einsum("iap,jbp->ijab", j1, j2)


@pytest.mark.parametrize("method", ntk.NTK_METHODS)
def test_empirical_ntk_matches_jacrev(network, params, reference_kernel, method):
    x1, x2 = _inputs(11, 5), _inputs(12, 7)
    full = ntk.empirical_ntk(network, params, x1, x2, trace=False, method=method)
    traced = ntk.empirical_ntk(network, params, x1, x2, trace=True, method=method)

    scale = float(jnp.abs(reference_kernel).max())
    assert full.shape == (5, 7, NUM_CLASSES, NUM_CLASSES)
    np.testing.assert_allclose(full, reference_kernel, atol=1e-5 * scale)
    trace = jnp.trace(reference_kernel, axis1=2, axis2=3)
    assert traced.shape == (5, 7)
    np.testing.assert_allclose(NUM_CLASSES * traced, trace, atol=1e-5 * scale * NUM_CLASSES)


@pytest.mark.parametrize("method", ntk.NTK_METHODS)
def test_empirical_ntk_tiled_equals_untiled(small_network, method):
    params = small_network.init(jax.random.key(1))
    x1, x2 = _inputs(13, 7), _inputs(14, 5)
    for trace in (False, True):
        whole = ntk.empirical_ntk(small_network, params, x1, x2, trace=trace, method=method)
        # A tile of 3 leaves partial last tiles on both inputs.
        tiled = ntk.empirical_ntk(
            small_network, params, x1, x2, trace=trace, method=method, batch_size=3
        )
        np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5 * float(whole.max()))


def test_empirical_ntk_same_inputs_tiled(small_network):
    params = small_network.init(jax.random.key(2))
    x = _inputs(15, 6)
    kernel = ntk.empirical_ntk(small_network, params, x, trace=False)
    explicit = ntk.empirical_ntk(small_network, params, x, x + 0.0, trace=False)
    tiled = ntk.empirical_ntk(small_network, params, x, trace=False, batch_size=4)

    np.testing.assert_allclose(kernel, explicit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tiled, explicit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernel, kernel.transpose(1, 0, 3, 2), rtol=1e-5, atol=1e-5)


def test_empirical_ntk_accepts_apply_function(small_network):
    params = small_network.init(jax.random.key(3))
    x = _inputs(16, 4)
    from_network = ntk.empirical_ntk(small_network, params, x)
    from_function = ntk.empirical_ntk(lambda p, inputs: small_network.apply(p, inputs), params, x)
    np.testing.assert_allclose(from_function, from_network, rtol=1e-6)


def test_empirical_ntk_rejects_bad_arguments(network, params):
    x = _inputs(17, 3)
    with pytest.raises(ValueError, match="method must be one of"):
        ntk.empirical_ntk(network, params, x, method="structured_guess")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ntk.empirical_ntk(network, params, x, batch_size=0)
    with pytest.raises(ValueError, match="same example shape"):
        ntk.empirical_ntk(network, params, x, jnp.ones((3, 4, 4, 1)))
    with pytest.raises(ValueError, match="Network or a function"):
        ntk.empirical_ntk("digits_cnn", params, x)


# --- Gradient descent on the squared error in closed form ---------------------------------


@pytest.fixture(scope="module")
def mse_problem(network, params):
    """8 training and 5 test inputs, one-hot targets, and the full NTKs at ``params``."""
    x_train, x_test = _inputs(20, 8), _inputs(21, 5)
    y_train = jax.nn.one_hot(jnp.arange(8) % NUM_CLASSES, NUM_CLASSES)
    return {
        "x_train": x_train,
        "x_test": x_test,
        "y_train": y_train,
        "ntk_train_train": ntk.empirical_ntk(network, params, x_train, trace=False),
        "ntk_test_train": ntk.empirical_ntk(network, params, x_test, x_train, trace=False),
        "fx_train_0": network.apply(params, x_train),
        "fx_test_0": network.apply(params, x_test),
    }


def _gradient_descent(network, params, problem, learning_rate, steps):
    """Train f_lin by plain gradient descent on the training set; outputs after ``steps``."""
    f_lin = ntk.linearize(network, params)

    def objective(theta):
        return losses.mean_squared_error(f_lin(theta, problem["x_train"]), problem["y_train"])

    def step(_, theta):
        grads = jax.grad(objective)(theta)
        return jax.tree.map(lambda p, g: p - learning_rate * g, theta, grads)

    theta = jax.jit(lambda p: jax.lax.fori_loop(0, steps, step, p))(params)
    return f_lin(theta, problem["x_train"]), f_lin(theta, problem["x_test"])


def test_predict_mse_infinite_time_fits_targets(mse_problem):
    p = mse_problem
    fx_train = ntk.predict_mse(p["ntk_train_train"], p["y_train"], p["fx_train_0"])
    np.testing.assert_allclose(fx_train, p["y_train"], atol=1e-3)


def test_predict_mse_infinite_time_is_kernel_regression(mse_problem):
    p = mse_problem
    n, c = p["y_train"].shape
    gram = np.asarray(p["ntk_train_train"], np.float64).transpose(0, 2, 1, 3).reshape(n * c, -1)
    cross = np.asarray(p["ntk_test_train"], np.float64).transpose(0, 2, 1, 3).reshape(5 * c, -1)
    residual = np.asarray(p["y_train"] - p["fx_train_0"], np.float64).reshape(-1)
    expected = np.asarray(p["fx_test_0"]) + (cross @ np.linalg.solve(gram, residual)).reshape(5, c)

    _, fx_test = ntk.predict_mse(
        p["ntk_train_train"], p["y_train"], p["fx_train_0"], None,
        ntk_test_train=p["ntk_test_train"], fx_test_0=p["fx_test_0"],
    )  # fmt: skip
    np.testing.assert_allclose(fx_test, expected, rtol=2e-3, atol=2e-3)


def test_predict_mse_matches_gradient_descent(network, params, mse_problem):
    p = mse_problem
    n = p["y_train"].shape[0]
    largest = float(jnp.linalg.eigvalsh(
        p["ntk_train_train"].transpose(0, 2, 1, 3).reshape(n * NUM_CLASSES, -1)
    ).max())  # fmt: skip
    # Euler steps of size learning_rate * lambda / n = 0.01 on the fastest mode track the flow.
    learning_rate, steps = 0.01 * n / largest, 150

    fx_train_gd, fx_test_gd = _gradient_descent(network, params, p, learning_rate, steps)
    fx_train, fx_test = ntk.predict_mse(
        p["ntk_train_train"], p["y_train"], p["fx_train_0"], steps,
        learning_rate=learning_rate, ntk_test_train=p["ntk_test_train"],
        fx_test_0=p["fx_test_0"],
    )  # fmt: skip

    moved = float(jnp.abs(fx_train_gd - p["fx_train_0"]).max())
    assert moved > 0.1, "gradient descent barely moved the outputs; the check would be vacuous"
    np.testing.assert_allclose(fx_train, fx_train_gd, atol=0.01 * moved)
    np.testing.assert_allclose(fx_test, fx_test_gd, atol=0.01 * moved)


def test_predict_mse_at_time_zero_keeps_initial_outputs(mse_problem):
    p = mse_problem
    fx_train, fx_test = ntk.predict_mse(
        p["ntk_train_train"], p["y_train"], p["fx_train_0"], 0.0,
        ntk_test_train=p["ntk_test_train"], fx_test_0=p["fx_test_0"],
    )  # fmt: skip
    np.testing.assert_allclose(fx_train, p["fx_train_0"], atol=1e-4)
    np.testing.assert_allclose(fx_test, p["fx_test_0"], atol=1e-6)


def test_predict_mse_traced_kernel_of_linear_model():
    # f(W, x) = x @ W has the NTK (x . x') I exactly, so its traced kernel is x . x'.
    network = nn.Network([nn.serial(nn.flatten, nn.dense(3, use_bias=False))], (6,))
    params = network.init(jax.random.key(30))
    x_train, x_test = jax.random.normal(jax.random.key(31), (4, 6)), jnp.ones((2, 6))
    y_train = jax.random.normal(jax.random.key(32), (4, 3))
    fx_train_0, fx_test_0 = network.apply(params, x_train), network.apply(params, x_test)

    traced = ntk.empirical_ntk(network, params, x_train)
    np.testing.assert_allclose(traced, x_train @ x_train.T, rtol=1e-5)
    full = ntk.empirical_ntk(network, params, x_train, trace=False)
    cross_traced = ntk.empirical_ntk(network, params, x_test, x_train)
    cross_full = ntk.empirical_ntk(network, params, x_test, x_train, trace=False)

    for t in (3.0, None):
        from_traced = ntk.predict_mse(
            traced, y_train, fx_train_0, t, ntk_test_train=cross_traced, fx_test_0=fx_test_0
        )
        from_full = ntk.predict_mse(
            full, y_train, fx_train_0, t, ntk_test_train=cross_full, fx_test_0=fx_test_0
        )
        for a, b in zip(from_traced, from_full):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_predict_mse_diag_reg_is_ridge_regression(mse_problem):
    p = mse_problem
    n, c = p["y_train"].shape
    gram = np.asarray(p["ntk_train_train"], np.float64).transpose(0, 2, 1, 3).reshape(n * c, -1)
    ridge = gram + 0.1 * np.mean(np.diag(gram)) * np.eye(n * c)
    residual = np.asarray(p["y_train"] - p["fx_train_0"], np.float64).reshape(-1)
    expected = np.asarray(p["fx_train_0"]) + (gram @ np.linalg.solve(ridge, residual)).reshape(n, c)

    fx_train = ntk.predict_mse(p["ntk_train_train"], p["y_train"], p["fx_train_0"], diag_reg=0.1)
    np.testing.assert_allclose(fx_train, expected, rtol=1e-3, atol=1e-3)


def test_predict_mse_rejects_bad_shapes(mse_problem):
    p = mse_problem
    with pytest.raises(ValueError, match="ntk_train_train must be"):
        ntk.predict_mse(p["ntk_train_train"][:4], p["y_train"], p["fx_train_0"])
    with pytest.raises(ValueError, match="both ntk_test_train and fx_test_0"):
        ntk.predict_mse(
            p["ntk_train_train"], p["y_train"], p["fx_train_0"],
            ntk_test_train=p["ntk_test_train"],
        )  # fmt: skip
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        ntk.predict_mse(p["ntk_train_train"], p["y_train"], p["fx_train_0"], learning_rate=0.0)
