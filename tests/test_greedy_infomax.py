"""InfoNCE against a NumPy loop, and the Greedy InfoMax rule's module boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import infonce, models, rules, train
from bpalt.rules.greedy_infomax import (
    fit_module_grids,
    infonce_evaluator,
    init_predictors,
    local_losses,
)


def numpy_infonce_at_offset(z, weight, offset, negative_indices):
    """The loss by explicit loops: -log softmax of the positive among 1 + N scores."""
    z, weight = np.asarray(z, np.float64), np.asarray(weight, np.float64)
    batch, rows, cols, channels = z.shape
    flat = z.reshape(-1, channels)
    losses = []
    for b in range(batch):
        for r in range(rows - offset):
            for c in range(cols):
                prediction = weight @ z[b, r, c]
                scores = [z[b, r + offset, c] @ prediction]
                scores += [flat[i] @ prediction for i in negative_indices[b, r, c]]
                scores = np.array(scores)
                log_normalizer = scores.max() + np.log(np.sum(np.exp(scores - scores.max())))
                losses.append(log_normalizer - scores[0])
    return np.mean(losses)


@pytest.fixture(scope="module")
def feature_map():
    """A (3, 7, 2, 4) feature map and two (4, 4) bilinear matrices."""
    z_key, w_key = jax.random.split(jax.random.key(5))
    z = jax.random.normal(z_key, (3, 7, 2, 4))
    weights = 0.5 * jax.random.normal(w_key, (2, 4, 4))
    return z, weights


@pytest.fixture(scope="module")
def cnn():
    return models.digits_cnn(channels=(4, 8))


@pytest.fixture(scope="module")
def cnn_params(cnn):
    return cnn.init(jax.random.key(0))


def test_prediction_offsets_of_paper_setting():
    assert infonce.prediction_offsets(5, 1) == (2, 3, 4, 5, 6)


def test_prediction_offsets_without_skip():
    assert infonce.prediction_offsets(3, 0) == (1, 2, 3)


@pytest.mark.parametrize("offset", [1, 3, 6])
def test_infonce_at_offset_matches_numpy(feature_map, offset):
    z, weights = feature_map
    indices = infonce.draw_negatives(jax.random.key(offset), z.shape, offset, 5)
    expected = numpy_infonce_at_offset(z, weights[0], offset, np.asarray(indices))
    actual = jax.jit(infonce.infonce_at_offset, static_argnums=2)(z, weights[0], offset, indices)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_infonce_averages_offsets(feature_map):
    z, weights = feature_map
    key = jax.random.key(11)
    offsets = infonce.prediction_offsets(2, 1)
    keys = jax.random.split(key, 2)
    expected = np.mean(
        [
            numpy_infonce_at_offset(
                z, w, offset, np.asarray(infonce.draw_negatives(k, z.shape, offset, 3))
            )
            for w, offset, k in zip(weights, offsets, keys)
        ]
    )
    actual = jax.jit(infonce.infonce, static_argnums=(2, 4))(z, weights, 1, key, 3)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_negatives_cover_every_position_and_image():
    indices = infonce.draw_negatives(jax.random.key(0), (4, 5, 3, 8), 2, 400)
    assert indices.shape == (4, 3, 3, 400)
    assert indices.dtype == jnp.int32
    assert int(indices.min()) == 0
    assert int(indices.max()) == 4 * 5 * 3 - 1


def test_fitted_grids_of_default_cnn_on_digits():
    grids = fit_module_grids(models.digits_cnn(), None, None)
    assert [(g.prediction_steps, g.skip, g.rows) for g in grids] == [(2, 1, 4), (1, 0, 2)]


def test_fitted_grids_on_28x28_use_paper_setting():
    grids = fit_module_grids(models.digits_cnn(input_shape=(28, 28, 1)), None, None)
    assert [(g.prediction_steps, g.skip) for g in grids] == [(5, 1), (5, 1)]


def test_offsets_beyond_grid_rejected():
    with pytest.raises(ValueError, match="grid of 4 rows"):
        fit_module_grids(models.digits_cnn(), 3, 1)


def test_dense_hidden_block_rejected():
    network = models.mlp((8, 8, 1), [16])
    with pytest.raises(ValueError, match="must output \\(rows >= 2, cols, channels\\)"):
        rules.get("gim", network)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_negatives": 0}, "num_negatives must be a positive integer"),
        ({"predictor_learning_rate": 0.0}, "predictor_learning_rate must be a positive"),
        ({"skip": -1}, "skip must be a non-negative integer"),
        ({"prediction_steps": [1, 1, 1]}, "one integer per hidden block \\(2\\)"),
        ({"prediction_steps": 1.0}, "prediction_steps must be an integer or a list"),
        ({"skip": 0.0}, "skip must be an integer or a list"),
    ],
)
def test_constructor_rejects_invalid_hyperparameters(cnn, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rules.get("gim", cnn, **kwargs)


def test_numpy_offsets_match_python(cnn):
    numpy_grids = fit_module_grids(cnn, np.int64(1), np.int64(0))
    assert numpy_grids == fit_module_grids(cnn, 1, 0)
    assert all(type(grid.skip) is int for grid in numpy_grids)
    assert all(type(grid.prediction_steps) is int for grid in numpy_grids)
    rules.get("gim", cnn, predictor_learning_rate=np.uint8(2))


def test_module_loss_gradient_is_local(cnn, cnn_params, digits_batch):
    grids = fit_module_grids(cnn, None, None)
    predictors = init_predictors(jax.random.key(3), grids)
    x, _ = digits_batch
    for module in range(len(grids)):

        def module_loss(params, module=module):
            values, _ = local_losses(cnn, grids, 8, params, predictors, x, jax.random.key(4))
            return values[module]

        grads = jax.jit(jax.grad(module_loss))(cnn_params)
        for other in range(cnn.num_blocks):
            leaves = jax.tree.leaves(grads[other])
            if other == module:
                assert any(np.abs(leaf).max() > 0 for leaf in leaves)
            else:
                assert all(np.all(np.asarray(leaf) == 0) for leaf in leaves)


def test_update_steps_predictors_and_reports_modules(cnn, cnn_params, digits_batch):
    rule = rules.get("gim", cnn)
    state = rule.init(jax.random.key(1), cnn_params)
    grads, new_state, metrics = jax.jit(rule.update)(
        state, cnn_params, digits_batch, jax.random.key(2)
    )

    assert set(metrics) == {"loss", "infonce/block0", "infonce/block1"}
    assert [w.shape for w in state.predictors] == [(2, 4, 4), (1, 8, 8)]
    for old, new in zip(state.predictors, new_state.predictors):
        assert not np.array_equal(old, new)
    assert jax.tree.structure(grads) == jax.tree.structure(cnn_params)


def test_heldout_infonce_falls_with_training(cnn, cnn_params, digits):
    # A short run on training digits lowers the InfoNCE loss measured on test digits.
    rule = rules.get("gim", cnn)
    optimizer = optax.adam(3e-3)
    step = jax.jit(train.make_train_step(rule, optimizer, jit=False))
    evaluate = jax.jit(infonce_evaluator(cnn))
    x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
    x_test = jnp.asarray(digits.x_test[:256])

    params, opt_state = cnn_params, optimizer.init(cnn_params)
    state = rule.init(jax.random.key(1), params)
    before = evaluate(state, params, x_test, jax.random.key(9))
    for index in range(40):
        batch = (
            x[32 * (index % 40) : 32 * (index % 40 + 1)],
            y[32 * (index % 40) : 32 * (index % 40 + 1)],
        )
        params, state, opt_state, _ = step(params, state, opt_state, batch, jax.random.key(index))
    after = evaluate(state, params, x_test, jax.random.key(9))

    assert set(after) == {"infonce", "infonce/block0", "infonce/block1"}
    assert float(after["infonce/block0"]) < float(before["infonce/block0"])
    assert float(after["infonce"]) < 0.8 * float(before["infonce"])
