"""The random-features baseline: only the read-out learns, by its true gradient."""

import jax
import numpy as np
import optax
import pytest

from bpalt import losses, models, nn, rules, train


@pytest.fixture(scope="module")
def cnn():
    return models.digits_cnn(channels=(4, 8))


def test_hidden_directions_are_exact_zeros(cnn, digits_batch):
    params = cnn.init(jax.random.key(0))
    rule = rules.get("random_features", cnn)
    grads, _, _ = jax.jit(rule.update)(rule.init(None, params), params, digits_batch, None)
    for block in grads[:-1]:
        for leaf in jax.tree.leaves(block):
            assert np.all(np.asarray(leaf) == 0)


def test_readout_direction_is_readout_loss_gradient(cnn, digits_batch):
    params = cnn.init(jax.random.key(0))
    x, y = digits_batch
    features = x
    for block, block_params in zip(cnn.blocks[:-1], params[:-1]):
        features = block.apply(block_params, features)
    features = np.asarray(features).reshape(len(x), -1)

    def readout_loss(readout):
        logits = features @ readout[1]["w"] + readout[1]["b"][None, :]
        return losses.softmax_cross_entropy(logits, y)

    expected = jax.grad(readout_loss)(params[-1])
    rule = rules.get("random_features", cnn)
    grads, _, metrics = rule.update(rule.init(None, params), params, digits_batch, None)
    np.testing.assert_allclose(grads[-1][1]["w"], expected[1]["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[-1][1]["b"], expected[1]["b"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], readout_loss(params[-1]), rtol=1e-6)


def test_training_keeps_hidden_blocks_bitwise(cnn, digits_batch):
    params = cnn.init(jax.random.key(0))
    rule = rules.get("random_features", cnn)
    optimizer = optax.sgd(0.1)
    step = train.make_train_step(rule, optimizer)
    new_params, opt_state, state = params, optimizer.init(params), rule.init(None, params)
    for index in range(3):
        new_params, state, opt_state, _ = step(
            new_params, state, opt_state, digits_batch, jax.random.key(index)
        )
    for old, new in zip(jax.tree.leaves(params[:-1]), jax.tree.leaves(new_params[:-1])):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(params[-1][1]["w"], new_params[-1][1]["w"])


def test_single_block_network_rejected():
    network = nn.Network([nn.serial(nn.flatten, nn.dense(10))], (8, 8, 1))
    with pytest.raises(ValueError, match="at least 2 blocks"):
        rules.get("random_features", network)
