"""Random features: a linear read-out trained on a frozen, randomly initialised network.

The baseline that layer-local rules (HSIC bottleneck, Greedy InfoMax) must beat: their
hidden blocks are worth something only if a read-out on them does better than the same
read-out on the random blocks they started from.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from bpalt import losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule
from bpalt.rules.direct_feedback_alignment import block_outputs_with_stopped_inputs
from bpalt.rules.registry import register


class RandomFeaturesState(NamedTuple):
    """Random features keep no state; the empty tuple keeps the protocol uniform."""


def check_has_hidden_block(network: Network, rule: str) -> None:
    """Raise ``ValueError`` unless ``network`` has a hidden block before its output block."""
    if network.num_blocks < 2:
        raise ValueError(
            f"rule {rule!r} needs a network of at least 2 blocks (hidden blocks, then an "
            f"output block used as the read-out), got {network.num_blocks}; use a model with "
            "at least one hidden layer"
        )


def readout_loss(network: Network, loss, params, batch) -> jax.Array:
    """Loss of the output block applied to the stopped output of the last hidden block.

    Its gradient reaches the output block's params only: every block input is stopped.
    """
    x, y = batch
    logits = block_outputs_with_stopped_inputs(network, params, x)[-1]
    return loss(logits, y)


def zeros_except_readout(grads):
    """Replace the gradient of every block but the last (the read-out) with exact zeros."""
    hidden = jax.tree.map(jax.numpy.zeros_like, grads[:-1])
    return (*hidden, grads[-1])


@register(
    "random_features",
    training={"epochs": 60, "batch_size": 64, "optimizer": "adam", "learning_rate": 1e-2},
)
def random_features(network: Network, loss=losses.softmax_cross_entropy) -> UpdateRule:
    """Train only the output block, by ``loss``, on the stopped features of frozen blocks.

    The hidden blocks keep their random initial weights: their entries of ``grads`` are
    exact zeros, so plain SGD never moves them. Optimizers that add weight decay to the
    update would still shrink them. The output block's entry is the true gradient of the
    read-out loss, so ``grads`` is the loss gradient of the read-out only, not of the
    network.

    Args:
        network: at least two blocks; the last one is the trained read-out.
        loss: ``loss(logits, labels) -> scalar``.

    Returns:
        An ``UpdateRule`` with state ``RandomFeaturesState``; metrics hold ``loss``.
    """
    check_has_hidden_block(network, "random_features")

    def init(key, params):
        del key, params
        return RandomFeaturesState()

    def update(state, params, batch, key):
        del key
        value, grads = jax.value_and_grad(lambda p: readout_loss(network, loss, p, batch))(params)
        return zeros_except_readout(grads), state, {"loss": value}

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="random_features")
