"""Why rules differ: alignment with backprop, feedback angles and per-layer gradient norms.

Every metric has one fixed name and one definition:

- ``update_cosine/<block>``: cosine between the rule's direction for the block's params
  (all its leaves flattened and concatenated) and the backprop gradient of the same params,
  at the same params and batch. 1 means the rule points where backprop points.
- ``update_norm_ratio/<block>``: norm of the rule's direction divided by the norm of the
  backprop gradient, for the same block (rule over backprop).
- ``weight_angle_deg/<block>``: angle in degrees between the block's linear weights
  (flattened and concatenated) and the feedback weights the rule uses in their place
  (feedback alignment and its variants). The network's first linear layer has feedback
  weights too, but the rule never uses them: the error it would carry goes to the input.
- ``grad_norm/<layer>``: norm of a parametric layer's gradient (all its leaves), for
  showing vanishing and exploding gradients; ``<layer>`` is ``block<i>.<j>``, the j-th
  layer of block i, or ``block<i>`` when the block is a single layer.

The backprop reference is computed beside the step from copies of nothing but the inputs:
it never changes the training state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bpalt.nn import Network
from bpalt.rules.base import UpdateRule

_TINY = 1e-30


def _flat(tree) -> jax.Array:
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros((0,))


def cosine(a, b) -> jax.Array:
    """Cosine between two pytrees of equal structure, flattened; 0 if either is zero."""
    a, b = _flat(a), _flat(b)
    return jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), _TINY)


def norm_ratio(a, b) -> jax.Array:
    """``||a|| / ||b||`` of two flattened pytrees."""
    return jnp.linalg.norm(_flat(a)) / jnp.maximum(jnp.linalg.norm(_flat(b)), _TINY)


def _has_leaves(tree) -> bool:
    return bool(jax.tree.leaves(tree))


def alignment_metrics(direction, reference, block_names) -> dict[str, jax.Array]:
    """``update_cosine/<block>`` and ``update_norm_ratio/<block>`` for blocks with params.

    Args:
        direction: the rule's direction, a tuple with one entry per block.
        reference: the backprop gradient with the same structure.
        block_names: one name per block.
    """
    metrics = {}
    for name, rule_block, true_block in zip(block_names, direction, reference):
        if not _has_leaves(true_block):
            continue
        metrics[f"update_cosine/{name}"] = cosine(rule_block, true_block)
        metrics[f"update_norm_ratio/{name}"] = norm_ratio(rule_block, true_block)
    return metrics


def _linear_weights(block_tree) -> list[jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(block_tree)[0]
    return [
        leaf
        for path, leaf in leaves
        if isinstance(path[-1], jax.tree_util.DictKey) and path[-1].key == "w"
    ]


def weight_angles(params, feedback, block_names) -> dict[str, jax.Array]:
    """``weight_angle_deg/<block>``: angle between each block's weights and feedback weights.

    ``feedback`` has the params' structure, as in feedback alignment's state.
    """
    metrics = {}
    for name, block_params, block_feedback in zip(block_names, params, feedback):
        weights = _linear_weights(block_params)
        if not weights:
            continue
        c = cosine(weights, _linear_weights(block_feedback))
        metrics[f"weight_angle_deg/{name}"] = jnp.degrees(jnp.arccos(jnp.clip(c, -1.0, 1.0)))
    return metrics


def layer_names(params) -> list[str]:
    """Names of the parametric layers in ``params``, in order (see ``grad_norm``)."""
    return list(_layer_groups(params))


def _layer_groups(tree) -> dict[str, list[jax.Array]]:
    groups: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        indices = [p.idx for p in path if isinstance(p, jax.tree_util.SequenceKey)]
        name = f"block{indices[0]}" + "".join(f".{i}" for i in indices[1:])
        groups.setdefault(name, []).append(leaf)
    return groups


def grad_norms(grads) -> dict[str, jax.Array]:
    """``grad_norm/<layer>``: the norm of every parametric layer's gradient."""
    return {
        f"grad_norm/{name}": jnp.linalg.norm(_flat(leaves))
        for name, leaves in _layer_groups(grads).items()
    }


def backprop_gradient(network: Network, loss, params, batch):
    """The true loss gradient: the reference every rule is compared with."""
    x, y = batch
    return jax.grad(lambda p: loss(network.apply(p, x), y))(params)


def make_diagnose(rule: UpdateRule, network: Network, loss):
    """Return ``diagnose(state, params, batch, key) -> metrics`` with every diagnostic.

    It runs the rule's ``update`` on the given state and discards the returned state, and
    computes the backprop gradient at the same params and batch; the caller's state is
    never changed. Metrics: ``update_cosine/*``, ``update_norm_ratio/*``, ``grad_norm/*``
    (of the backprop gradient) and, when the rule state has params-shaped ``feedback``,
    ``weight_angle_deg/*``.
    """

    def diagnose(state, params, batch, key):
        direction, _, _ = rule.update(state, params, batch, key)
        reference = backprop_gradient(network, loss, params, batch)

        metrics = alignment_metrics(direction, reference, network.block_names)
        metrics.update(grad_norms(reference))
        feedback = getattr(state, "feedback", None)
        if feedback is not None and jax.tree.structure(feedback) == jax.tree.structure(params):
            metrics.update(weight_angles(params, feedback, network.block_names))
        return metrics

    return diagnose


def mean_update_cosine(metrics: dict[str, float]) -> float:
    """Mean of the ``update_cosine/*`` entries of a metrics dict (nan if there are none)."""
    values = [v for k, v in metrics.items() if k.startswith("update_cosine/")]
    return sum(values) / len(values) if values else math.nan
