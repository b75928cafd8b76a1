"""Why rules differ: alignment with backprop, feedback angles and per-layer gradient norms.

Every metric has one fixed name and one definition:

- ``update_cosine/<block>``: cosine between the rule's direction for the block's params
  (all its leaves flattened and concatenated) and the backprop gradient of the same params,
  at the same params and batch. 1 means the rule points where backprop points; a block
  whose direction or gradient is all zeros gets 0.
- ``update_norm_ratio/<block>``: norm of the rule's direction divided by the norm of the
  backprop gradient, for the same block (rule over backprop). 1 for backprop itself.
- ``weight_angle_deg/<block>``: angle in degrees between the block's linear weights (the
  ``"w"`` leaves, flattened and concatenated) and the feedback weights that the rule sends
  the error through in their place. It exists for feedback alignment and for the variants
  whose state has a params-shaped ``feedback`` field. The network's first linear layer is
  left out, because its feedback would only carry the error to the input and the rule never
  uses it; a block with no other linear layer gets no angle. 0 degrees means the feedback is
  a positive multiple of the weights; with feedback equal to the weights, feedback alignment
  is backprop.
- ``grad_norm/<layer>``: Euclidean norm of one parametric layer's backprop gradient (weights
  and bias together), for showing vanishing and exploding gradients. ``<layer>`` is
  ``block<i>.<j>`` for the j-th layer of block i (``serial`` counts every layer, so in
  ``models.mlp`` the first dense layer is ``block0.1`` after the flatten), or ``block<i>``
  when the block is a single layer.

``make_diagnose`` computes the backprop reference beside the training step. It reads the
params, the rule state and the batch and returns new arrays only, so the training state is
never changed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bpalt.nn import Network
from bpalt.rules.base import UpdateRule

# Floor for norms used as divisors, so that an all-zero direction or gradient gives a
# cosine of 0 and a finite ratio instead of nan.
_TINY = 1e-30


def _flat(tree) -> jax.Array:
    """Flatten and concatenate all leaves of ``tree``: (total size,)."""
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)]
    return jnp.concatenate(leaves) if leaves else jnp.zeros((0,))


def _norm(vector: jax.Array) -> jax.Array:
    """Compute the Euclidean norm of a 1-D array, scaled so that tiny entries do not vanish.

    Vanishing gradients reach 1e-20 and below, where ``sum(x**2)`` underflows to 0 in
    float32. Dividing by the largest absolute entry first keeps every square in range.
    """
    if vector.size == 0:
        return jnp.zeros((), vector.dtype)
    scale = jnp.max(jnp.abs(vector))
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return scale * jnp.linalg.norm(vector / safe_scale)


def cosine(a, b) -> jax.Array:
    """Compute the cosine between two flattened pytrees of equal structure (0 if either is 0)."""
    a, b = _flat(a), _flat(b)
    a_unit = a / jnp.maximum(_norm(a), _TINY)
    b_unit = b / jnp.maximum(_norm(b), _TINY)
    return jnp.dot(a_unit, b_unit)


def norm_ratio(a, b) -> jax.Array:
    """``||a|| / ||b||`` of two flattened pytrees (``||b||`` floored at 1e-30)."""
    return _norm(_flat(a)) / jnp.maximum(_norm(_flat(b)), _TINY)


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


def _is_weight(path) -> bool:
    last = path[-1]
    return isinstance(last, jax.tree_util.DictKey) and last.key == "w"


def _used_weights(tree) -> list[list[jax.Array]]:
    """Per block, the ``"w"`` leaves of every linear layer except the network's first one.

    ``tree`` is params-shaped: a tuple with one entry per block. Leaves are visited in
    forward order (blocks and ``serial`` layers are tuples), so the first ``"w"`` leaf found
    belongs to the first linear layer.
    """
    per_block, seen_first = [], False
    for block_tree in tree:
        weights = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(block_tree)[0]:
            if not _is_weight(path):
                continue
            if seen_first:
                weights.append(leaf)
            seen_first = True
        per_block.append(weights)
    return per_block


def weight_angles(params, feedback, block_names) -> dict[str, jax.Array]:
    """``weight_angle_deg/<block>``: angle between each block's weights and its feedback.

    ``feedback`` has the params' structure, as in feedback alignment's state. The network's
    first linear layer is skipped (its feedback is never used), so a block made of that
    layer alone gets no entry.
    """
    metrics = {}
    used_params, used_feedback = _used_weights(params), _used_weights(feedback)
    for name, weights, feedback_weights in zip(block_names, used_params, used_feedback):
        if not weights:
            continue
        c = cosine(weights, feedback_weights)
        metrics[f"weight_angle_deg/{name}"] = jnp.degrees(jnp.arccos(jnp.clip(c, -1.0, 1.0)))
    return metrics


def layer_names(params) -> list[str]:
    """Names of the parametric layers in ``params``, in order (see ``grad_norm``)."""
    return list(_layer_groups(params))


def _layer_groups(tree) -> dict[str, list[jax.Array]]:
    """Leaves grouped by layer name: ``block<i>`` plus ``.<j>`` per level of tuple nesting."""
    groups: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        indices = [p.idx for p in path if isinstance(p, jax.tree_util.SequenceKey)]
        name = f"block{indices[0]}" + "".join(f".{i}" for i in indices[1:])
        groups.setdefault(name, []).append(leaf)
    return groups


def grad_norms(grads) -> dict[str, jax.Array]:
    """``grad_norm/<layer>``: the norm of every parametric layer's gradient."""
    return {
        f"grad_norm/{name}": _norm(_flat(leaves)) for name, leaves in _layer_groups(grads).items()
    }


def backprop_gradient(network: Network, loss, params, batch):
    """Compute the true loss gradient, the reference that every rule is compared with."""
    x, y = batch
    return jax.grad(lambda p: loss(network.apply(p, x), y))(params)


def make_diagnose(rule: UpdateRule, network: Network, loss):
    """Return ``diagnose(state, params, batch, key) -> metrics`` with every diagnostic.

    ``diagnose`` calls the rule's ``update`` on the given state and drops the state it
    returns, and computes the backprop gradient at the same params and batch. Both are pure
    functions of their inputs, so the caller's params and rule state stay as they were (a
    test compares them bitwise). Metrics: ``update_cosine/*``, ``update_norm_ratio/*``,
    ``grad_norm/*`` (of the backprop gradient) and, when the rule state has a params-shaped
    ``feedback`` field, ``weight_angle_deg/*``.
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
