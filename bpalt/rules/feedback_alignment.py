"""Feedback alignment (Lillicrap et al. 2016, arXiv:1411.0247)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from bpalt import initializers, losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule, check_positive
from bpalt.rules.registry import register


class FeedbackAlignmentState(NamedTuple):
    """State of feedback alignment.

    Attributes:
        feedback: a pytree with the structure, shapes and dtypes of ``params``. Each linear
            layer's weight leaf ``"w"`` holds its fixed random feedback matrix ``B`` (dense:
            (in, out); conv: HWIO kernel). Bias leaves are kept for the shared structure and
            never read. The first layer's ``B`` is never used either: the gradient with
            respect to the network input goes nowhere.
    """

    feedback: Any


def _is_weight(path) -> bool:
    last = path[-1]
    return isinstance(last, jax.tree_util.DictKey) and last.key == "w"


def init_feedback(network: Network, key, params, feedback_init=None, feedback_scale=1.0):
    """Draw fixed random feedback weights shaped like ``params``.

    With ``feedback_init=None`` each layer's ``B`` comes from that layer's own weight
    initializer (the network initialised again from ``key``); otherwise every weight leaf
    is drawn from ``feedback_init``. ``feedback_scale`` multiplies every ``B``.
    """
    if feedback_init is None:
        feedback = network.init(key)
    else:
        draw = initializers.get(feedback_init)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = jax.random.split(key, len(leaves))
        feedback = treedef.unflatten(
            [
                draw(k, leaf.shape, leaf.dtype) if _is_weight(path) else leaf
                for k, (path, leaf) in zip(keys, leaves)
            ]
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf * feedback_scale if _is_weight(path) else leaf, feedback
    )


@register("fa")
def feedback_alignment(
    network: Network,
    loss=losses.softmax_cross_entropy,
    *,
    feedback_init=None,
    feedback_scale: float = 1.0,
) -> UpdateRule:
    """Feedback alignment: the error crosses each linear layer through a fixed random ``B``.

    The forward pass is the network's own. In the backward pass every dense or convolution
    layer sends ``B^T delta`` (the transposed convolution with kernel ``B`` for a conv) to
    the layer below instead of ``W^T delta``; weight gradients keep their true local form
    ``x^T delta``. ``grads`` is therefore not the loss gradient, except when ``B = W``, where
    the rule equals backprop exactly. Activations and pooling backpropagate as usual.

    Args:
        network: the network; its linear layers get one ``B`` each.
        loss: ``loss(logits, labels) -> scalar``.
        feedback_init: initializer (name or function) for ``B``; ``None`` uses each layer's
            own weight initializer.
        feedback_scale: factor applied to every ``B``.

    Returns:
        An ``UpdateRule`` with state ``FeedbackAlignmentState``; metrics hold ``loss``.
    """
    check_positive("feedback_scale", feedback_scale)
    if feedback_init is not None:
        initializers.get(feedback_init)

    def objective(params, feedback, batch):
        x, y = batch
        return loss(network.feedback_apply(params, feedback, x), y)

    def init(key, params):
        return FeedbackAlignmentState(
            init_feedback(network, key, params, feedback_init, feedback_scale)
        )

    def update(state, params, batch, key):
        del key
        value, grads = jax.value_and_grad(objective)(params, state.feedback, batch)
        return grads, state, {"loss": value}

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="fa")
