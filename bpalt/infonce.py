"""InfoNCE over the spatial grid of a feature map, as Greedy InfoMax trains each module.

Greedy InfoMax (Löwe, O'Connor, Veeling 2019, arXiv:1905.11786) follows contrastive
predictive coding (van den Oord et al. 2018, arXiv:1807.03748) on images: the feature
vector at grid position ``(r, c)`` predicts the vectors ``offset`` rows below it through a
bilinear score, and must pick the true one out of ``N`` negatives.

For ``k = 1 .. K`` the offset is ``k + skip`` rows. The score of a candidate ``z'`` for the
context ``z[r, c]`` is ``z'^T W_k z[r, c]``, with one ``(channels, channels)`` matrix ``W_k``
per offset and no bias. The positive is ``z[r + k + skip, c]`` of the same image. The
negatives are drawn uniformly, with replacement, from every position of every image in the
batch, so a negative can coincide with the positive, as it can in the authors' code. The
loss of one context is the cross-entropy of a softmax over the ``1 + N`` scores with the
positive as the target. It is averaged over contexts, then over the ``K`` offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def prediction_offsets(prediction_steps: int, skip: int) -> tuple[int, ...]:
    """Row offsets ``k + skip`` for ``k = 1 .. prediction_steps``.

    With ``prediction_steps = 5`` and ``skip = 1`` (the authors' setting, which skips the
    patch that overlaps the context by half) the offsets are 2, 3, 4, 5 and 6 rows.
    """
    return tuple(k + skip for k in range(1, prediction_steps + 1))


def draw_negatives(
    key: jax.Array, z_shape: tuple[int, ...], offset: int, num_negatives: int
) -> jax.Array:
    """Indices of the negatives for every context row that has a target ``offset`` rows down.

    Args:
        key: the PRNG key.
        z_shape: ``(batch, rows, cols, channels)`` of the feature map.
        offset: the row offset of the targets.
        num_negatives: ``N``, the negatives per context.

    Returns:
        int32 (batch, rows - offset, cols, N) indices into the feature map flattened to
        (batch * rows * cols, channels), drawn uniformly with replacement.
    """
    batch, rows, cols, _ = z_shape
    shape = (batch, rows - offset, cols, num_negatives)
    return jax.random.randint(key, shape, 0, batch * rows * cols, dtype=jnp.int32)


def infonce_at_offset(
    z: jax.Array, weight: jax.Array, offset: int, negative_indices: jax.Array
) -> jax.Array:
    """Mean InfoNCE loss of predicting the rows ``offset`` below each context.

    Args:
        z: (batch, rows, cols, channels) feature map.
        weight: (channels, channels) bilinear matrix ``W`` of this offset.
        offset: row offset of the targets, ``1 <= offset < rows``.
        negative_indices: (batch, rows - offset, cols, N) from ``draw_negatives``.

    Returns:
        The scalar loss, the mean over all contexts.
    """
    rows, channels = z.shape[1], z.shape[3]
    context = z[:, : rows - offset]
    target = z[:, offset:]
    prediction = context @ weight.T

    positive = jnp.sum(target * prediction, axis=-1)
    candidates = z.reshape(-1, channels)[negative_indices]
    negative = jnp.einsum("brcnk,brck->brcn", candidates, prediction)

    logits = jnp.concatenate([positive[..., None], negative], axis=-1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)


def infonce(
    z: jax.Array, weights: jax.Array, skip: int, key: jax.Array, num_negatives: int
) -> jax.Array:
    """InfoNCE loss of one feature map, averaged over the ``K`` offsets.

    Args:
        z: (batch, rows, cols, channels) feature map.
        weights: (K, channels, channels), one ``W_k`` per offset ``k + skip``.
        skip: rows skipped between a context and its first target.
        key: PRNG key for the negatives; each offset draws its own.
        num_negatives: ``N``.

    Returns:
        The scalar loss.
    """
    offsets = prediction_offsets(weights.shape[0], skip)
    keys = jax.random.split(key, len(offsets))
    losses = [
        infonce_at_offset(z, weight, offset, draw_negatives(k, z.shape, offset, num_negatives))
        for weight, offset, k in zip(weights, offsets, keys)
    ]
    return jnp.mean(jnp.stack(losses))
