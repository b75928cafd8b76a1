"""Direct feedback alignment (Nøkland 2016, arXiv:1609.01596)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpalt import initializers, losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule, check_positive
from bpalt.rules.registry import register


class DirectFeedbackAlignmentState(NamedTuple):
    """State of direct feedback alignment.

    Attributes:
        feedback: a tuple with one fixed random matrix per hidden block ``l``, of shape
            (classes, n_l) with n_l the number of units in that block's output.
    """

    feedback: tuple[jax.Array, ...]


def block_outputs_with_stopped_inputs(network: Network, params, x):
    """Compute every block's output, each from its stopped input.

    A gradient taken through these outputs reaches only the params of the block that
    produced each one: the block-local vector-Jacobian product. The batch runs in the
    network's chunks (``Network.in_chunks``).
    """

    def stopped_outputs(x):
        outputs = []
        for block, block_params in zip(network.blocks, params):
            x = block.apply(block_params, jax.lax.stop_gradient(x))
            outputs.append(x)
        return outputs

    return network.in_chunks(stopped_outputs, x)


@register("dfa")
def direct_feedback_alignment(
    network: Network,
    loss=losses.softmax_cross_entropy,
    *,
    feedback_init=None,
    feedback_scale: float = 1.0,
) -> UpdateRule:
    """Direct feedback alignment: every hidden block gets the output error through its own B.

    With ``e = dL/dlogits`` (batch, classes), hidden block ``l`` receives the cotangent
    ``e @ B_l`` reshaped to its output's shape, at its output (after activation and
    pooling), and its parameter direction is the block-local VJP at that cotangent with the
    block input held constant, so the block's own activation derivative and pooling apply.
    The output block gets its true gradient. All blocks follow from ``e`` at once, with no
    sequential backward pass. ``grads`` is not the loss gradient; with one hidden block and
    ``B`` equal to the transposed output weights it equals backprop.

    Args:
        network: a network of at least one block; the last one yields the logits.
        loss: ``loss(logits, labels) -> scalar``.
        feedback_init: initializer for each ``B_l``; ``None`` draws uniformly from
            [-1/sqrt(n_l), 1/sqrt(n_l)].
        feedback_scale: factor applied to every ``B_l``.

    Returns:
        An ``UpdateRule`` with state ``DirectFeedbackAlignmentState``; metrics hold ``loss``.
    """
    check_positive("feedback_scale", feedback_scale)
    if feedback_init is not None:
        initializers.get(feedback_init)
    num_classes = math.prod(network.output_shape)
    hidden_sizes = [math.prod(shape) for shape in network.block_shapes[:-1]]

    def init(key, params):
        del params
        feedback = []
        for block_key, size in zip(jax.random.split(key, max(len(hidden_sizes), 1)), hidden_sizes):
            shape = (num_classes, size)
            if feedback_init is None:
                bound = 1.0 / math.sqrt(size)
                matrix = jax.random.uniform(block_key, shape, minval=-bound, maxval=bound)
            else:
                matrix = initializers.get(feedback_init)(block_key, shape)
            feedback.append(feedback_scale * matrix)
        return DirectFeedbackAlignmentState(tuple(feedback))

    def surrogate(params, feedback, batch):
        x, y = batch
        outputs = block_outputs_with_stopped_inputs(network, params, x)
        logits = outputs[-1]
        value = loss(logits, y)

        error = jax.grad(loss)(jax.lax.stop_gradient(logits), y)
        error = error.reshape(error.shape[0], -1)
        total = value
        for output, matrix in zip(outputs[:-1], feedback):
            cotangent = jax.lax.stop_gradient((error @ matrix).reshape(output.shape))
            total = total + jnp.sum(output * cotangent)
        return total, value

    def update(state, params, batch, key):
        del key
        grads, value = jax.grad(surrogate, has_aux=True)(params, state.feedback, batch)
        return grads, state, {"loss": value}

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="dfa")
