"""Training the linearised network (Jacot et al. 2018, arXiv:1806.07572; Lee et al. 2019,
arXiv:1902.06720)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bpalt import losses
from bpalt.nn import Network
from bpalt.ntk import linearize
from bpalt.rules.base import UpdateRule
from bpalt.rules.registry import register


class NTKLinearizedState(NamedTuple):
    """State of the NTK-linearised rule.

    Attributes:
        params0: the linearisation point ``theta0``, a pytree with the structure, shapes and
            dtypes of ``params``: the params the rule was initialised with. Fixed.
    """

    params0: Any


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree)))


@register(
    "ntk",
    training={"epochs": 20, "batch_size": 64, "optimizer": "adam", "learning_rate": 1e-2},
)
def ntk_linearized(network: Network, loss=losses.softmax_cross_entropy) -> UpdateRule:
    """Train the network's first-order Taylor expansion at its initial params.

    The model is ``f_lin(theta, x) = f(theta0, x) + J(theta0, x) (theta - theta0)``, linear
    in ``theta``, with ``theta0`` the params at ``init``, kept in the state. Each step
    evaluates it with one ``jax.jvp`` (no Jacobian is built) and returns

        grads = d loss(f_lin(theta, x), y) / d theta = J(theta0, x)^T dloss/dlogits,

    the gradient of the linearised model's loss. It is not the gradient of the network's own
    loss (the two agree only at ``theta = theta0``). ``predict`` returns ``f_lin``, so the
    network trained by this rule is the linearised one; its activation pattern stays that of
    ``theta0``. With the squared error and gradient descent, its outputs follow the kernel
    dynamics of ``bpalt.ntk.predict_mse``.

    Args:
        network: the network ``f``.
        loss: ``loss(logits, labels) -> scalar``.

    Returns:
        An ``UpdateRule`` with state ``NTKLinearizedState``. Metrics: ``loss`` (of f_lin on
        the batch) and ``relative_distance`` ``||theta - theta0|| / ||theta0||``.
    """

    def init(key, params):
        del key
        # A copy, so that donating the params buffers cannot invalidate theta0.
        return NTKLinearizedState(jax.tree.map(jnp.copy, params))

    def objective(params, params0, batch):
        x, y = batch
        return loss(linearize(network, params0)(params, x), y)

    def update(state, params, batch, key):
        del key
        value, grads = jax.value_and_grad(objective)(params, state.params0, batch)
        delta = jax.tree.map(jnp.subtract, params, state.params0)
        distance = _global_norm(delta) / _global_norm(state.params0)
        return grads, state, {"loss": value, "relative_distance": distance}

    def predict(state, params, x):
        return linearize(network, state.params0)(params, x)

    return UpdateRule(init, update, predict, name="ntk")
