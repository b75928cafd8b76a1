"""Hilbert-Schmidt independence criterion (HSIC) estimators on a batch.

The HSIC bottleneck rule (Ma, Lewis, Kleijn 2020, arXiv:1908.01580) trains each block to
keep its output ``Z`` dependent on the labels ``Y`` and independent of the input ``X``,
measuring dependence with these estimators. Every function works on one batch of ``m``
examples and builds each ``m x m`` kernel once.

- ``gaussian_kernel``: ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2 d))`` with ``d`` the
  feature dimension, so the effective width grows as ``sqrt(d)``.
- ``hsic``: the biased estimator ``(m - 1)^-2 tr(K_X H K_Z H)`` with the centring matrix
  ``H = I - 11^T / m`` (Gretton et al. 2005).
- ``normalized_hsic``: ``tr(R_X R_Z)`` with ``R = K_c (K_c + eps m I)^-1`` per variable and
  ``K_c = H K H`` the centred kernel: the normalised estimator the authors train with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

NORMALIZED_HSIC_EPSILON = 1e-5
"""Ridge ``eps`` of ``R = K_c (K_c + eps m I)^-1``, the value in the authors' code."""


def squared_distances(x: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances ``D_ij = ||x_i - x_j||^2``.

    Shapes: ``x`` (m, ...) is flattened to (m, d); the result is (m, m), symmetric, with a
    zero diagonal and no negative entries.
    """
    x = x.reshape(x.shape[0], -1)
    norms = jnp.sum(x * x, axis=1)
    distances = norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)

    # Rounding in the expanded form can leave tiny negatives and a non-zero diagonal.
    distances = jnp.maximum(distances, 0.0)
    return distances * (1.0 - jnp.eye(x.shape[0], dtype=distances.dtype))


def gaussian_kernel(x: jax.Array, sigma) -> jax.Array:
    """Gaussian kernel matrix ``exp(-D / (2 sigma^2 d))`` of a batch.

    ``d`` is the number of features of one example, so the kernel width ``sigma sqrt(d)``
    grows with the dimension and variables of different sizes share one ``sigma``.

    Shapes: ``x`` (m, ...) -> (m, m).
    """
    dimension = x[0].size
    return jnp.exp(-squared_distances(x) / (2.0 * sigma**2 * dimension))


def center(kernel: jax.Array) -> jax.Array:
    """Centred kernel ``H K H`` with ``H = I - 11^T / m``, without forming ``H``.

    Shapes: (m, m) -> (m, m).
    """
    row_means = kernel.mean(axis=0, keepdims=True)
    column_means = kernel.mean(axis=1, keepdims=True)
    return kernel - row_means - column_means + kernel.mean()


def hsic(kernel_x: jax.Array, kernel_z: jax.Array) -> jax.Array:
    """Biased HSIC estimate ``(m - 1)^-2 tr(K_X H K_Z H)`` from two kernel matrices.

    Shapes: two (m, m) matrices -> a scalar.
    """
    return hsic_from_centred(center(kernel_x), center(kernel_z))


def hsic_from_centred(centred_x: jax.Array, centred_z: jax.Array) -> jax.Array:
    """Biased HSIC from two centred kernels ``H K_X H`` and ``H K_Z H``.

    Since ``H`` is idempotent and the kernels are symmetric, ``tr(K_X H K_Z H)`` equals the
    sum over all entries of the elementwise product of the two centred kernels.

    Shapes: two (m, m) matrices -> a scalar.
    """
    m = centred_x.shape[0]
    return jnp.sum(centred_x * centred_z) / (m - 1) ** 2


def normalized_kernel(kernel: jax.Array, epsilon: float = NORMALIZED_HSIC_EPSILON) -> jax.Array:
    """``R = K_c (K_c + eps m I)^-1`` with ``K_c = H K H`` the centred kernel.

    ``K_c`` and ``(K_c + eps m I)^-1`` are functions of the same symmetric matrix, so they
    commute and ``R = (K_c + eps m I)^-1 K_c``: one Cholesky solve, since ``K_c`` is
    positive semi-definite and the ridge makes the system positive definite.

    Shapes: (m, m) -> (m, m), symmetric up to rounding.
    """
    m = kernel.shape[0]
    centred = center(kernel)
    ridged = centred + epsilon * m * jnp.eye(m, dtype=centred.dtype)
    return cho_solve(cho_factor(ridged, lower=True), centred)


def normalized_hsic(normalized_x: jax.Array, normalized_z: jax.Array) -> jax.Array:
    """Normalised HSIC ``tr(R_X R_Z)`` from two outputs of ``normalized_kernel``.

    Shapes: two (m, m) matrices -> a scalar.
    """
    return jnp.sum(normalized_x * normalized_z.T)


def hsic_of(x: jax.Array, z: jax.Array, sigma) -> jax.Array:
    """Biased HSIC between two batches with Gaussian kernels of the same ``sigma``.

    Shapes: ``x`` (m, ...) and ``z`` (m, ...) -> a scalar.
    """
    return hsic(gaussian_kernel(x, sigma), gaussian_kernel(z, sigma))


def normalized_hsic_of(
    x: jax.Array, z: jax.Array, sigma, epsilon: float = NORMALIZED_HSIC_EPSILON
) -> jax.Array:
    """Normalised HSIC between two batches with Gaussian kernels of the same ``sigma``.

    Shapes: ``x`` (m, ...) and ``z`` (m, ...) -> a scalar.
    """
    return normalized_hsic(
        normalized_kernel(gaussian_kernel(x, sigma), epsilon),
        normalized_kernel(gaussian_kernel(z, sigma), epsilon),
    )
