"""The jitted step, seeds under vmap, divergence guards, epoch order and evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from bpalt import losses, models, nn, rules, train

SEEDS = (0, 1, 2)
NUM_EXAMPLES = 100
BATCH = 32


def _copy(tree):
    """Copy every leaf: ``make_seeds_step`` donates the state it receives."""
    return jax.tree.map(jnp.copy, tree)


def _seed(tree, index):
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for actual_leaf, expected_leaf in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(actual_leaf, expected_leaf, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data(digits):
    return jnp.asarray(digits.x_train[:NUM_EXAMPLES]), jnp.asarray(digits.y_train[:NUM_EXAMPLES])


@pytest.fixture(scope="module")
def optimizer():
    return optax.adam(1e-2)


@pytest.fixture(scope="module")
def network():
    # One dense hidden block: seeds tests compile vmapped inits, which are slow for a CNN.
    return models.mlp((8, 8, 1), [16], activation=nn.tanh)


@pytest.fixture(scope="module")
def fa_rule(network):
    return rules.feedback_alignment(network)


@pytest.fixture(scope="module")
def seeds_state(fa_rule, network, optimizer):
    """Three stacked feedback-alignment runs. Tests step a copy, because the step donates it."""
    return train.init_seeds(fa_rule, network, optimizer, SEEDS)


@pytest.fixture(scope="module", params=["vmap", "map"])
def seeds_step(request, fa_rule, optimizer):
    return train.make_seeds_step(fa_rule, optimizer, seed_loop=request.param)


# --- One step ---------------------------------------------------------------------------------


def test_train_step_equals_hand_written(small_cnn, draw_params, data):
    optimizer = optax.sgd(0.1, momentum=0.9)
    rule = rules.backprop(small_cnn)
    params = draw_params(jax.eval_shape(small_cnn.init, jax.random.key(0)))
    batches = [(data[0][i : i + BATCH], data[1][i : i + BATCH]) for i in (0, 32, 64)]

    def loss(params, batch):
        return losses.softmax_cross_entropy(small_cnn.apply(params, batch[0]), batch[1])

    @jax.jit
    def reference_step(params, opt_state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = train.make_train_step(rule, optimizer)
    expected, expected_opt = params, optimizer.init(params)
    actual, rule_state, actual_opt = params, rule.init(None, params), optimizer.init(params)
    for index, batch in enumerate(batches):
        key = jax.random.key(index)
        expected, expected_opt = reference_step(expected, expected_opt, batch)
        actual, rule_state, actual_opt, metrics = step(actual, rule_state, actual_opt, batch, key)
        assert float(metrics["loss"]) > 0
    _assert_trees_close(actual, expected)
    _assert_trees_close(actual_opt, expected_opt)
    assert not np.allclose(actual[0][0]["w"], params[0][0]["w"])


# --- Seeds under vmap -------------------------------------------------------------------------


def test_init_seeds_equals_single_runs(seeds_state, fa_rule, network, optimizer):
    for index, seed in enumerate(SEEDS):
        alone = train.init_train_state(fa_rule, network, optimizer, jax.random.key(seed))
        stacked = _seed(seeds_state, index)
        # Under vmap and jit the Gaussian draws may differ from eager ones in the last bit.
        _assert_trees_close(stacked.params, alone.params)
        _assert_trees_close(stacked.rule_state, alone.rule_state)
        np.testing.assert_array_equal(
            jax.random.key_data(stacked.key), jax.random.key_data(alone.key)
        )
    assert seeds_state.diverged.shape == (3,)
    assert not np.any(np.asarray(seeds_state.diverged))
    assert not np.allclose(seeds_state.params[0][1]["w"][0], seeds_state.params[0][1]["w"][1])


def test_seeds_step_equals_single_runs(seeds_state, seeds_step, fa_rule, optimizer, data):
    x, y = data
    rng = np.random.default_rng(0)
    indices = [jnp.asarray(rng.permutation(NUM_EXAMPLES)[: 3 * BATCH].reshape(3, BATCH))]
    indices.append(jnp.asarray(rng.permutation(NUM_EXAMPLES)[: 3 * BATCH].reshape(3, BATCH)))

    state = _copy(seeds_state)
    for step_indices in indices:
        state, metrics = seeds_step(state, x, y, step_indices)

    step = train.make_train_step(fa_rule, optimizer)
    for index in range(len(SEEDS)):
        alone = _seed(seeds_state, index)
        params, rule_state, opt_state = alone.params, alone.rule_state, alone.opt_state
        for count, step_indices in enumerate(indices):
            key = jax.random.fold_in(alone.key, count)
            batch = (x[step_indices[index]], y[step_indices[index]])
            params, rule_state, opt_state, alone_metrics = step(
                params, rule_state, opt_state, batch, key
            )
        _assert_trees_close(_seed(state.params, index), params, rtol=1e-5, atol=1e-6)
        assert float(metrics["loss"][index]) == pytest.approx(
            float(alone_metrics["loss"]), rel=1e-5
        )
    np.testing.assert_array_equal(state.step, [2, 2, 2])
    np.testing.assert_array_equal(state.diverged_step, [-1, -1, -1])


def test_nan_params_freeze_one_seed(seeds_state, seeds_step, data):
    x, y = data
    state = _copy(seeds_state)
    state = state._replace(params=jax.tree.map(lambda leaf: leaf.at[1].set(jnp.nan), state.params))
    start = jax.tree.map(np.asarray, state.params)
    indices = jnp.arange(3 * BATCH).reshape(3, BATCH)
    for _ in range(3):
        state, metrics = seeds_step(state, x, y, indices)

    np.testing.assert_array_equal(state.diverged, [False, True, False])
    np.testing.assert_array_equal(state.diverged_step, [-1, 0, -1])
    np.testing.assert_array_equal(state.step, [3, 3, 3])
    # The diverged seed keeps its state: no optimizer step was counted.
    np.testing.assert_array_equal(state.opt_state[0].count, [3, 0, 3])
    for index in (0, 2):
        for leaf in jax.tree.leaves(state.params):
            assert np.all(np.isfinite(np.asarray(leaf[index])))
        assert not np.allclose(state.params[0][1]["w"][index], start[0][1]["w"][index])
        assert np.isfinite(float(metrics["loss"][index]))
    for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isnan(np.asarray(leaf[1])))


def test_non_finite_update_keeps_last_finite_params(seeds_state, seeds_step, data):
    # An infinite Adam moment in seed 0 makes the next params infinite while the loss, which
    # is computed before the update, is still finite.
    x, y = data
    state = _copy(seeds_state)
    adam_state = state.opt_state[0]
    corrupt_mu = jax.tree.map(lambda leaf: leaf.at[0].set(jnp.inf), adam_state.mu)
    state = state._replace(opt_state=(adam_state._replace(mu=corrupt_mu), *state.opt_state[1:]))
    start = jax.tree.map(np.asarray, state.params)
    indices = jnp.arange(3 * BATCH).reshape(3, BATCH)
    state, metrics = seeds_step(state, x, y, indices)

    assert np.isfinite(float(metrics["loss"][0]))
    np.testing.assert_array_equal(state.diverged, [True, False, False])
    np.testing.assert_array_equal(state.diverged_step, [0, -1, -1])
    for leaf, start_leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(leaf[0]), start_leaf[0])
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_intermediate_bytes_closed_form():
    def fn(a, b):
        outer = lax.mul(lax.broadcast_in_dim(a, (1000, 300), (0,)), lax.broadcast(b, (1000,)))
        return lax.reduce_sum(outer, (0,)), jax.jit(lambda v: lax.neg(v))(b)

    a = jax.ShapeDtypeStruct((1000,), jnp.float32)
    b = jax.ShapeDtypeStruct((300,), jnp.float32)
    # Three (1000, 300) arrays, the sum, and the negation inside and outside the jit.
    assert train.intermediate_bytes(fn, a, b) == 3 * 1000 * 300 * 4 + 3 * 300 * 4


def test_largest_array_bytes_closed_form():
    def fn(a, b):
        outer = jax.jit(lambda a, b: jnp.outer(a, b))(a, b)
        return outer.sum() + jnp.tile(a, 5).sum()

    a = jax.ShapeDtypeStruct((1000,), jnp.float32)
    b = jax.ShapeDtypeStruct((300,), jnp.float32)
    # The (1000, 300) product, created inside a nested jit, beats the 5000-element tile.
    assert train.largest_array_bytes(fn, a, b) == 1000 * 300 * 4
    assert train.largest_array_bytes(lambda a, b: a, a, b) == 0


def test_auto_seed_loop_follows_created_bytes(fa_rule, optimizer, seeds_state, data):
    x, y = data

    def loop(state, indices):
        return train.seed_loop_for(fa_rule, optimizer, state, x, y, indices)

    small = jnp.zeros((3, BATCH), jnp.int32)
    assert loop(seeds_state, small) == "vmap"
    assert loop(_seed(seeds_state, slice(0, 1)), small[:1]) == "map"
    # 64 * 2**10 examples of 8x8 inputs: the gathered batch alone is 16 MiB.
    large = jnp.zeros((3, 64 * 2**10), jnp.int32)
    assert loop(seeds_state, large) == "map"


def test_auto_loop_maps_gim_patch_cnn(optimizer):
    # One seed of this step creates about 64 MiB of arrays. Three seeds took 26 ms under
    # lax.map and 39 ms under vmap on 2 cores.
    network = models.patch_cnn((28, 28, 1), 10, patch=8, stride=4, channels=[32, 32], kernel=1)
    rule = rules.get("gim", network)
    state = train.init_seeds(rule, network, optimizer, range(3))
    x = jax.ShapeDtypeStruct((100, 28, 28, 1), jnp.float32)
    y = jax.ShapeDtypeStruct((100,), jnp.int32)
    indices = jnp.zeros((3, 32), jnp.int32)

    one_seed = train._one_seed_step(rule, optimizer)
    unbatched = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), state)
    created = train.intermediate_bytes(one_seed, unbatched, x, y, indices[0])
    assert created > train.MAP_THRESHOLD_BYTES
    assert train.seed_loop_for(rule, optimizer, state, x, y, indices) == "map"


def test_unknown_seed_loop_raises(fa_rule, optimizer):
    with pytest.raises(ValueError, match="seed_loop 'pmap'.*auto, vmap, map"):
        train.make_seeds_step(fa_rule, optimizer, seed_loop="pmap")


def test_select_seeds(seeds_state):
    selected = train.select_seeds(seeds_state, [True, False, True])
    np.testing.assert_array_equal(selected.params[0][1]["w"][1], seeds_state.params[0][1]["w"][2])
    assert selected.step.shape == (2,)
    assert jax.random.key_data(selected.key).shape[0] == 2


# --- Epochs -----------------------------------------------------------------------------------


def test_epoch_permutations_cover_each_example_once(seeds_state):
    order = np.asarray(train.epoch_permutations(seeds_state, 0, NUM_EXAMPLES, BATCH))
    assert order.shape == (NUM_EXAMPLES // BATCH, len(SEEDS), BATCH)
    for index in range(len(SEEDS)):
        seen = order[:, index].ravel()
        assert len(np.unique(seen)) == seen.size
        assert seen.min() >= 0
        assert seen.max() < NUM_EXAMPLES


def test_epoch_permutations_deterministic(seeds_state):
    first = train.epoch_permutations(seeds_state, 4, NUM_EXAMPLES, BATCH)
    again = train.epoch_permutations(seeds_state, 4, NUM_EXAMPLES, BATCH)
    other_epoch = train.epoch_permutations(seeds_state, 5, NUM_EXAMPLES, BATCH)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_epoch)
    assert not np.array_equal(first[:, 0], first[:, 1])


def test_run_epoch(seeds_state, seeds_step, data):
    x, y = data
    steps = []
    state, means = train.run_epoch(
        seeds_step,
        _copy(seeds_state),
        x,
        y,
        epoch=0,
        batch_size=BATCH,
        on_step=lambda index, state: steps.append(index),
    )
    assert steps == [0, 1, 2]
    np.testing.assert_array_equal(state.step, [3, 3, 3])
    assert means["loss"].shape == (3,)
    assert np.all(np.isfinite(np.asarray(means["loss"])))


def test_run_epoch_batch_larger_than_data_raises(seeds_state, data):
    x, y = data
    calls = []
    with pytest.raises(ValueError, match=r"batch size 101 is larger than the training set \(100"):
        train.run_epoch(calls.append, seeds_state, x, y, epoch=0, batch_size=NUM_EXAMPLES + 1)
    assert calls == []


@pytest.mark.parametrize("batch_size", [0, -4, 2.0])
def test_run_epoch_bad_batch_size_raises(seeds_state, data, batch_size):
    x, y = data
    with pytest.raises(ValueError, match="batch size must be a positive integer"):
        train.run_epoch(None, seeds_state, x, y, epoch=0, batch_size=batch_size)


# --- Evaluation -------------------------------------------------------------------------------


def test_evaluate_equals_numpy(seeds_state, fa_rule, network, data):
    x, y = data
    evaluate = train.make_evaluate(fa_rule, losses.softmax_cross_entropy, chunk_size=40)
    accuracy, loss = evaluate(seeds_state, x, y)
    apply = jax.jit(network.apply)
    assert accuracy.shape == (3,)
    for index in range(len(SEEDS)):
        logits = np.asarray(apply(_seed(seeds_state.params, index), x), np.float64)
        expected_accuracy = np.mean(np.argmax(logits, axis=1) == np.asarray(y))
        shifted = logits - logits.max(1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        expected_loss = -np.mean(log_probabilities[np.arange(NUM_EXAMPLES), np.asarray(y)])
        # One example changes the accuracy by 0.01, so 1e-6 only absorbs float32 rounding.
        assert accuracy[index] == pytest.approx(expected_accuracy, abs=1e-6)
        assert loss[index] == pytest.approx(expected_loss, rel=1e-5)
