"""Losses: ``loss(logits, labels) -> scalar``, averaged over the batch.

Every loss takes the network's raw outputs (logits) and the labels as the data set stores
them: integer class indices of shape (batch,), or one-hot / probability targets of the
logits' shape. A rule receives its loss as such a function.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    """Raise ``ValueError`` unless ``labels`` are classes (batch,) or targets like ``logits``.

    Shapes are static under ``jit``, so the check runs once, while tracing. Without it,
    labels of shape (batch, 1) would broadcast against (batch, classes) logits.
    """
    if labels.shape not in (logits.shape[:-1], logits.shape):
        raise ValueError(
            f"labels of shape {labels.shape} fit neither integer classes {logits.shape[:-1]} "
            f"nor targets {logits.shape} for logits of shape {logits.shape}"
        )


def _targets_like(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """One-hot encode integer labels; pass targets of the logits' shape through."""
    _check_labels(logits, labels)
    if labels.shape == logits.shape:
        return labels.astype(logits.dtype)
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum_c y_c log softmax(logits)_c``.

    Shapes: ``logits`` (batch, classes); ``labels`` (batch,) integers or (batch, classes)
    one-hot or probabilities.
    """
    _check_labels(logits, labels)
    if labels.ndim == logits.ndim - 1 and jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = _targets_like(logits, labels)
    return optax.softmax_cross_entropy(logits, targets).mean()


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy of ``sigmoid(logits)``, mean over all elements.

    Written from logits as ``max(z, 0) - z y + log(1 + exp(-|z|))``, which equals
    ``-y log sigmoid(z) - (1 - y) log(1 - sigmoid(z))`` and stays finite for any ``|z|``.
    Integer class labels are one-hot encoded, so a multi-class output is treated as
    independent sigmoid units (as in Akrout et al. 2019, arXiv:1904.05391).
    """
    targets = _targets_like(logits, labels)
    losses = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return losses.mean()


def mean_squared_error(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``0.5 * mean over the batch of ||outputs - targets||^2``; integer labels become one-hot.

    The factor 1/2 makes the gradient with respect to the outputs ``(outputs - targets) /
    batch``, the convention of the NTK gradient-flow formulas.
    """
    targets = _targets_like(logits, labels)
    squared = jnp.sum((logits - targets) ** 2, axis=tuple(range(1, logits.ndim)))
    return 0.5 * squared.mean()


LOSSES: dict[str, Loss] = {
    "cross_entropy": softmax_cross_entropy,
    "binary_cross_entropy": binary_cross_entropy,
    "mse": mean_squared_error,
}


def get(name: str | Loss) -> Loss:
    """Return the loss called ``name`` (``cross_entropy``, ``binary_cross_entropy``, ``mse``)."""
    if callable(name):
        return name
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; accepted: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
