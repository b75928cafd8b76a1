"""Backpropagation: the exact loss gradient through ``jax.grad``, the baseline for all rules."""

from __future__ import annotations

from typing import NamedTuple

import jax

from bpalt import losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule
from bpalt.rules.registry import register


class BackpropState(NamedTuple):
    """Backprop keeps no state; the empty tuple keeps the protocol uniform."""


@register("bp")
def backprop(network: Network, loss=losses.softmax_cross_entropy) -> UpdateRule:
    """Backpropagation: ``grads`` is the true gradient of ``loss(network.apply(params, x), y)``.

    Returns:
        An ``UpdateRule`` whose metrics hold ``loss``.

    Example:
        >>> import jax, optax
        >>> from bpalt import models, rules
        >>> network = models.digits_cnn()
        >>> rule = rules.backprop(network)
        >>> params = network.init(jax.random.key(0))
        >>> state = rule.init(jax.random.key(1), params)
        >>> x, y = jax.numpy.zeros((4, 8, 8, 1)), jax.numpy.zeros((4,), int)
        >>> grads, state, metrics = rule.update(state, params, (x, y), jax.random.key(2))
    """

    def objective(params, batch):
        x, y = batch
        return loss(network.apply(params, x), y)

    def init(key, params):
        del key, params
        return BackpropState()

    def update(state, params, batch, key):
        del key
        value, grads = jax.value_and_grad(objective)(params, batch)
        return grads, state, {"loss": value}

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="bp")
