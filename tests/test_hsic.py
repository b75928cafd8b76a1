"""HSIC estimators against plain NumPy formulas, and the HSIC bottleneck rule's locality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import hsic, models, nn, rules, train
from bpalt.rules.hsic_bottleneck import (
    HSICObjective,
    freeze_hidden_after,
    hidden_representation,
    local_losses,
    make_estimator,
    unformatted_accuracy,
)

M = 24


def numpy_kernel(x, sigma):
    """Gaussian kernel by an explicit double loop over the batch."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    m, d = x.shape
    kernel = np.empty((m, m))
    for i in range(m):
        for j in range(m):
            kernel[i, j] = np.exp(-np.sum((x[i] - x[j]) ** 2) / (2 * sigma**2 * d))
    return kernel


def numpy_hsic(x, z, sigma):
    m = len(x)
    h = np.eye(m) - np.ones((m, m)) / m
    return np.trace(numpy_kernel(x, sigma) @ h @ numpy_kernel(z, sigma) @ h) / (m - 1) ** 2


def numpy_ratio(kernel, epsilon=1e-5):
    """``K_c (K_c + eps m I)^-1`` with ``K_c = H K H``, by an explicit inverse."""
    m = len(kernel)
    h = np.eye(m) - np.ones((m, m)) / m
    centred = h @ kernel @ h
    return centred @ np.linalg.inv(centred + epsilon * m * np.eye(m))


def numpy_normalized_hsic(x, z, sigma, epsilon=1e-5):
    ratio_z = numpy_ratio(numpy_kernel(z, sigma), epsilon)
    return np.trace(ratio_z @ numpy_ratio(numpy_kernel(x, sigma), epsilon))


def solve_normalized_hsic(x, z, sigma=1.0, epsilon=1e-5):
    """Compute normalised HSIC through ``jnp.linalg.solve``, for plain autodiff."""

    def ratio(kernel):
        centred = hsic.center(kernel)
        return jnp.linalg.solve(centred + epsilon * len(kernel) * jnp.eye(len(kernel)), centred)

    return jnp.sum(ratio(hsic.gaussian_kernel(x, sigma)) * ratio(hsic.gaussian_kernel(z, sigma)))


@pytest.fixture(scope="module")
def pair():
    """A dependent pair: z is a noisy nonlinear function of x; (24, 3, 2) and (24, 5)."""
    x_key, w_key, n_key = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(x_key, (M, 3, 2))
    z = jnp.tanh(x.reshape(M, -1) @ jax.random.normal(w_key, (6, 5)))
    return x, z + 0.1 * jax.random.normal(n_key, z.shape)


@pytest.fixture(scope="module")
def cnn():
    return models.digits_cnn(channels=(4, 8))


@pytest.fixture(scope="module")
def cnn_params(cnn):
    return cnn.init(jax.random.key(0))


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gaussian_kernel_matches_numpy(pair, sigma):
    x, _ = pair
    np.testing.assert_allclose(hsic.gaussian_kernel(x, sigma), numpy_kernel(x, sigma), atol=1e-6)


def broadcast_squared_distances(x):
    """Compute ``||x_i - x_j||^2`` from the differences themselves, without the Gram matrix."""
    x = x.reshape(x.shape[0], -1)
    return jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, axis=-1)


def test_squared_distances_derivatives(pair):
    # gram's hand-written tangent against autodiff of the differences, in reverse mode,
    # forward mode and second order.
    _, z = pair
    weights = jax.random.normal(jax.random.key(5), (M, M))

    def scalar(distances_fn):
        return lambda z: jnp.sum(weights * jnp.sin(distances_fn(z)))

    fast, slow = scalar(hsic.squared_distances), scalar(broadcast_squared_distances)
    np.testing.assert_allclose(jax.grad(fast)(z), jax.grad(slow)(z), rtol=1e-4, atol=1e-4)

    direction = jax.random.normal(jax.random.key(6), z.shape)
    forward = jax.jvp(hsic.squared_distances, (z,), (direction,))[1]
    expected = jax.jvp(broadcast_squared_distances, (z,), (direction,))[1]
    np.testing.assert_allclose(forward, expected, rtol=1e-4, atol=1e-4)

    hvp = jax.jvp(jax.grad(fast), (z,), (direction,))[1]
    expected = jax.jvp(jax.grad(slow), (z,), (direction,))[1]
    np.testing.assert_allclose(hvp, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_center_symmetric_equals_center(pair):
    x, _ = pair
    kernel = hsic.gaussian_kernel(x, 1.0)
    h = np.eye(M) - np.ones((M, M)) / M
    expected = h @ np.asarray(kernel, np.float64) @ h
    np.testing.assert_allclose(hsic.center_symmetric(kernel), expected, atol=1e-6)
    np.testing.assert_allclose(hsic.center(kernel), expected, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_plain_hsic_matches_numpy(pair, sigma):
    x, z = pair
    expected = numpy_hsic(x, z, sigma)
    np.testing.assert_allclose(hsic.hsic_of(x, z, sigma), expected, rtol=1e-4)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_normalized_hsic_matches_numpy(pair, sigma):
    x, z = pair
    expected = numpy_normalized_hsic(x, z, sigma)
    np.testing.assert_allclose(hsic.normalized_hsic_of(x, z, sigma), expected, rtol=1e-4)


@pytest.mark.parametrize("sigma", [0.5, 5.0])
def test_one_hot_shortcut_matches_numpy(sigma):
    labels = jax.random.randint(jax.random.key(3), (M,), 0, 4)
    one_hot = jax.nn.one_hot(labels, 4)
    expected = numpy_ratio(numpy_kernel(one_hot, sigma))
    np.testing.assert_allclose(hsic.normalized_one_hot_kernel(one_hot, sigma), expected, atol=1e-5)


def test_hsic_larger_for_dependent_pair(pair):
    x, z = pair
    independent = jax.random.normal(jax.random.key(99), z.shape)
    assert hsic.hsic_of(x, z, 1.0) > 2 * hsic.hsic_of(x, independent, 1.0)


def test_normalized_hsic_gradient_matches_plain_solve(pair):
    # The hand-written backward pass of the ridge solve against autodiff of a plain solve.
    x, z = pair

    reference = functools.partial(solve_normalized_hsic, x)

    expected = jax.grad(reference)(z)
    actual = jax.grad(lambda z: hsic.normalized_hsic_of(x, z, 1.0))(z)
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_normalized_hsic_under_vmap(pair):
    x, z = pair
    batched = jax.jit(jax.vmap(lambda z: hsic.normalized_hsic_of(x, z, 1.0)))
    values = batched(jnp.stack([z, 2 * z, z]))
    np.testing.assert_allclose(values[0], hsic.normalized_hsic_of(x, z, 1.0), rtol=1e-4)
    np.testing.assert_allclose(values[1], hsic.normalized_hsic_of(x, 2 * z, 1.0), rtol=1e-4)


@pytest.mark.parametrize("estimator", ["normalized", "plain"])
def test_block_loss_gradient_is_local(cnn, cnn_params, digits_batch, estimator):
    objective = HSICObjective(
        estimator=make_estimator(estimator),
        sigma_x=5.0,
        sigma_y=5.0,
        sigma_z=5.0,
        beta=100.0,
        standardize=True,
        num_classes=10,
    )
    for block in range(cnn.num_blocks - 1):

        def block_loss(params, block=block):
            values, _ = local_losses(cnn, objective, params, digits_batch)
            return values[block][0]

        grads = jax.jit(jax.grad(block_loss))(cnn_params)
        for other in range(cnn.num_blocks):
            leaves = jax.tree.leaves(grads[other])
            if other == block:
                assert any(np.abs(leaf).max() > 0 for leaf in leaves)
            else:
                assert all(np.all(np.asarray(leaf) == 0) for leaf in leaves)


def test_readout_term_leaves_hidden_directions_unchanged(cnn, cnn_params, digits_batch):
    # The read-out loss must not reach the hidden blocks: changing the read-out weights
    # changes its own direction but not, by a single bit, the hidden blocks' directions.
    rule = rules.get("hsic", cnn)
    state = rule.init(jax.random.key(1), cnn_params)
    readout = jax.tree.map(lambda w: 3.0 * w + 0.5, cnn_params[-1])
    changed = (*cnn_params[:-1], readout)

    grads, _, _ = jax.jit(rule.update)(state, cnn_params, digits_batch, jax.random.key(2))
    grads_changed, _, _ = jax.jit(rule.update)(state, changed, digits_batch, jax.random.key(2))
    for block in range(cnn.num_blocks - 1):
        for a, b in zip(jax.tree.leaves(grads[block]), jax.tree.leaves(grads_changed[block])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(grads[-1])[0], jax.tree.leaves(grads_changed[-1])[0])


def _train(rule, network, optimizer, batch, steps, params):
    step = jax.jit(train.make_train_step(rule, optimizer, jit=False))
    state, opt_state = rule.init(jax.random.key(1), params), optimizer.init(params)
    history = []
    for index in range(steps):
        params, state, opt_state, metrics = step(
            params, state, opt_state, batch, jax.random.key(index)
        )
        history.append(params)
    return history


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_readout_phase_freezes_hidden_blocks(cnn, cnn_params, digits_batch, optimizer):
    hsic_steps = 2
    rule = rules.get("hsic", cnn, readout="after", hsic_steps=hsic_steps)
    inner = optax.sgd(0.1) if optimizer == "sgd" else optax.adam(1e-2)
    history = _train(rule, cnn, freeze_hidden_after(inner, hsic_steps), digits_batch, 5, cnn_params)

    after_hsic = history[hsic_steps - 1]
    for block in range(cnn.num_blocks - 1):
        assert not np.array_equal(after_hsic[block][0]["w"], cnn_params[block][0]["w"])
        for later in history[hsic_steps:]:
            for a, b in zip(jax.tree.leaves(after_hsic[block]), jax.tree.leaves(later[block])):
                np.testing.assert_array_equal(a, b)

    # The read-out stays at its initial value during the HSIC phase, then learns.
    readout_leaves = jax.tree.leaves(after_hsic[-1])
    for a, b in zip(readout_leaves, jax.tree.leaves(cnn_params[-1])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(history[-1][-1])[0], readout_leaves[0])


def test_sequential_mode_recomputes_next_input(cnn, cnn_params, digits_batch):
    # With step size s, block 1's sequential direction equals the simultaneous direction
    # at params whose block 0 has already taken the SGD step -s * direction_0.
    step_size = 0.05
    sequential = rules.get("hsic", cnn, mode="sequential", sequential_step_size=step_size)
    simultaneous = rules.get("hsic", cnn)
    state = sequential.init(jax.random.key(1), cnn_params)
    key = jax.random.key(2)

    grads_seq, _, _ = jax.jit(sequential.update)(state, cnn_params, digits_batch, key)
    grads_sim, _, _ = jax.jit(simultaneous.update)(state, cnn_params, digits_batch, key)
    moved = jax.tree.map(lambda p, g: p - step_size * g, cnn_params[0], grads_sim[0])
    grads_moved, _, _ = jax.jit(simultaneous.update)(
        state, (moved, *cnn_params[1:]), digits_batch, key
    )

    def relative_distance(a, b):
        a, b = (np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(t)]) for t in (a, b))
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert relative_distance(grads_seq[0], grads_sim[0]) < 1e-4
    assert relative_distance(grads_seq[1], grads_moved[1]) < 1e-3
    assert relative_distance(grads_seq[1], grads_sim[1]) > 1e-2


def test_metrics_name_every_hidden_block(cnn, cnn_params, digits_batch):
    rule = rules.get("hsic", cnn)
    state = rule.init(jax.random.key(1), cnn_params)
    _, new_state, metrics = jax.jit(rule.update)(state, cnn_params, digits_batch, jax.random.key(2))
    expected = {"loss"} | {
        f"{kind}/block{i}" for kind in ("hsic_loss", "hsic_zx", "hsic_zy") for i in (0, 1)
    }
    assert set(metrics) == expected
    assert int(new_state.step) == 1


def test_unformatted_accuracy_matches_permuted_units():
    # Units are a permutation of the classes: every example is recovered.
    labels = np.arange(40) % 4
    permutation = np.array([2, 0, 3, 1])
    outputs = np.eye(4)[permutation[labels]] + 0.01
    assert unformatted_accuracy(outputs, labels, 4) == 1.0


def test_unformatted_accuracy_averages_recall():
    labels = np.array([0, 0, 0, 0, 1, 1])
    outputs = np.eye(2)[[0, 0, 0, 1, 1, 1]]
    accuracy = unformatted_accuracy(outputs, labels, 2)
    assert isinstance(accuracy, float)
    assert accuracy == pytest.approx((3 / 4 + 1) / 2)


def test_unformatted_accuracy_of_network_in_unit_interval(digits_batch):
    network = models.mlp((8, 8, 1), [16, 10], activation=nn.tanh)
    params = network.init(jax.random.key(0))
    x, y = digits_batch
    accuracy = unformatted_accuracy(hidden_representation(network, params, x), y, 10)
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0


def test_unformatted_accuracy_rejects_width_mismatch(cnn, cnn_params, digits_batch):
    x, y = digits_batch
    outputs = hidden_representation(cnn, cnn_params, x)
    with pytest.raises(ValueError, match="32 units for 10 classes"):
        unformatted_accuracy(outputs, y, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma must be a positive number"),
        ({"sigma_y": -1.0}, "sigma_y must be a positive number"),
        ({"beta": -2.0}, "beta must be a positive number"),
        ({"beta": float("inf")}, "beta must be a finite positive number, got inf"),
        ({"estimator": "unbiased"}, "estimator must be one of 'normalized', 'plain'"),
        ({"mode": "greedy"}, "mode must be one of 'simultaneous', 'sequential'"),
        ({"readout": "never"}, "readout must be one of 'joint', 'after'"),
        ({"hsic_steps": 0}, "hsic_steps must be a positive integer"),
        ({"standardize": 0}, "standardize must be True or False, got 0"),
    ],
)
def test_constructor_rejects_invalid_hyperparameters(cnn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rules.get("hsic", cnn, **kwargs)


def test_constructor_rejects_single_block_network():
    network = nn.Network([nn.serial(nn.flatten, nn.dense(10))], (8, 8, 1))
    with pytest.raises(ValueError, match="at least 2 blocks"):
        rules.get("hsic", network)


@pytest.mark.parametrize("size", [5, 100, 257])
def test_spd_inverse_matches_numpy(size):
    rng = np.random.default_rng(size)
    factor = rng.normal(size=(size, size))
    matrix = factor @ factor.T / size + 0.1 * np.eye(size)
    expected = np.linalg.inv(matrix)

    inverse = np.asarray(jax.jit(hsic.spd_inverse)(jnp.asarray(matrix, jnp.float32)), np.float64)
    tolerance = 2e-4 * np.abs(expected).max()
    np.testing.assert_allclose(inverse, expected, rtol=0, atol=tolerance)

    stacked = jnp.asarray(np.stack([matrix, 2.0 * matrix]), jnp.float32)
    batched = np.asarray(jax.jit(jax.vmap(hsic.spd_inverse))(stacked), np.float64)
    np.testing.assert_allclose(batched[1], expected / 2.0, rtol=0, atol=tolerance)


@pytest.mark.parametrize("size", [5, 100])
def test_spd_inverse_derivatives(size):
    # d(A^-1) = -A^-1 dA A^-1, in forward mode, reverse mode and under jacfwd.
    rng = np.random.default_rng(size)
    factor = rng.normal(size=(size, size))
    matrix = factor @ factor.T / size + np.eye(size)
    direction = rng.normal(size=(size, size))
    weights = rng.normal(size=(size, size))
    inverse = np.linalg.inv(matrix)
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    tangent = jax.jvp(hsic.spd_inverse, (as32(matrix),), (as32(direction),))[1]
    np.testing.assert_allclose(tangent, -inverse @ direction @ inverse, atol=2e-4)

    grad = jax.grad(lambda a: jnp.sum(as32(weights) * hsic.spd_inverse(a)))(as32(matrix))
    np.testing.assert_allclose(grad, -inverse.T @ weights @ inverse.T, atol=2e-4)

    if size == 5:
        jacobian = jax.jacfwd(hsic.spd_inverse)(as32(matrix))
        expected = -np.einsum("ik,lj->ijkl", inverse, inverse)
        np.testing.assert_allclose(jacobian, expected, atol=2e-5)


def test_normalized_hsic_higher_derivatives(pair):
    # The hand-written derivative of the ridge ratio against autodiff of a plain solve.
    x, z = pair

    reference = functools.partial(solve_normalized_hsic, x)

    def estimate(z):
        return hsic.normalized_hsic_of(x, z, 1.0)

    direction = jax.random.normal(jax.random.key(8), z.shape)
    expected = jax.jvp(reference, (z,), (direction,))[1]
    np.testing.assert_allclose(jax.jvp(estimate, (z,), (direction,))[1], expected, rtol=1e-3)

    hvp = jax.jvp(jax.grad(estimate), (z,), (direction,))[1]
    expected = jax.jvp(jax.grad(reference), (z,), (direction,))[1]
    np.testing.assert_allclose(hvp, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())


def test_plain_hsic_float16_large_batch():
    # (m - 1)^2 exceeds float16's largest finite value from m = 257, so the sum runs in
    # float32.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    z = np.tanh(x[:, :3])
    expected = hsic.hsic_of(jnp.asarray(x), jnp.asarray(z), 2.0)
    half = hsic.hsic_of(jnp.asarray(x, jnp.float16), jnp.asarray(z, jnp.float16), 2.0)
    assert half.dtype == jnp.float16
    np.testing.assert_allclose(float(half), float(expected), rtol=1e-2)


def test_estimators_reject_batch_of_one(cnn, cnn_params, digits_batch):
    x = jnp.ones((1, 4))
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        hsic.hsic_of(x, x, 1.0)
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        hsic.normalized_hsic_of(x, x, 1.0)

    images, labels = digits_batch
    rule = rules.get("hsic", cnn, estimator="plain")
    state = rule.init(jax.random.key(0), cnn_params)
    with pytest.raises(ValueError, match="at least 2 examples, got 1"):
        jax.jit(rule.update)(state, cnn_params, (images[:1], labels[:1]), jax.random.key(1))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_normalized_rejects_half_precision(dtype):
    x = jnp.ones((8, 3), dtype).at[0, 0].set(2)
    with pytest.raises(ValueError, match=f"got {jnp.dtype(dtype).name}.*cast the inputs"):
        hsic.normalized_hsic_of(x, x, 1.0)


def test_spd_inverse_of_ridged_kernel_matches_float64():
    # The normalised estimator's matrix: a centred Gaussian kernel of a batch of 256 plus
    # the ridge eps * m, condition number near 1e5.
    rng = np.random.default_rng(0)
    z = rng.standard_normal((256, 128)).astype(np.float32)
    centred = hsic.center(hsic.gaussian_kernel(jnp.asarray(z), 5.0))
    ridge = hsic.NORMALIZED_HSIC_EPSILON * 256
    matrix = centred + ridge * jnp.eye(256)
    expected = np.linalg.inv(np.asarray(matrix, np.float64))

    inverse = np.asarray(hsic.spd_inverse(matrix), np.float64)
    assert np.abs(inverse - expected).max() <= 2e-4 * np.abs(expected).max()
    assert np.abs(ridge * (inverse - expected)).max() <= 1e-4


def test_held_out_unformatted_accuracy_only_when_widths_match(cnn, digits_batch):
    assert rules.held_out_evaluator("hsic", cnn) is None
    assert rules.held_out_evaluator("bp", cnn) is None

    network = models.mlp((8, 8, 1), [16, 10])
    evaluate = rules.held_out_evaluator("hsic", network, sigma=3.0)
    params = network.init(jax.random.key(0))
    x, y = digits_batch
    expected = unformatted_accuracy(hidden_representation(network, params, x), y, 10)
    assert evaluate(None, params, x, y) == {"unformatted_accuracy": expected}
