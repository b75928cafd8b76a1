"""Neural tangent kernels in plain JAX: the linearised model, the empirical NTK and MSE training.

For a network ``f(theta, x)`` with C outputs, the empirical neural tangent kernel (Jacot et
al. 2018, arXiv:1806.07572) of two inputs is the C x C matrix

    Theta(x1, x2) = J(theta, x1) J(theta, x2)^T,    J(theta, x) = d f(theta, x) / d theta.

Around a point ``theta0`` the network's first-order Taylor expansion (Lee et al. 2019,
arXiv:1902.06720)

    f_lin(theta, x) = f(theta0, x) + J(theta0, x) (theta - theta0)

is linear in ``theta``. Gradient descent on the squared error moves f_lin's outputs by the
fixed kernel ``Theta`` at ``theta0``, which gives the closed form of ``predict_mse``.

Nothing here depends on neural-tangents: its release 0.6.5 fails to import with jax 0.10.2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bpalt.nn import Network

ApplyFn = Callable[[Any, jax.Array], jax.Array]

NTK_METHODS = ("jacobian", "ntvp")
DEFAULT_NTK_METHOD = "jacobian"


# --- The linearised model -----------------------------------------------------------------


def _apply_fn(network: Network | ApplyFn) -> ApplyFn:
    """Return ``network.apply`` for a ``Network``, or a callable ``f(params, x)`` as it is."""
    if isinstance(network, Network):
        return network.apply
    if callable(network):
        return network
    raise ValueError(
        f"expected a bpalt Network or a function f(params, x), got {type(network).__name__}"
    )


def linearize(network: Network | ApplyFn, params0) -> ApplyFn:
    """Return ``f_lin(params, x)``, the first-order Taylor expansion of ``f`` at ``params0``.

    ``f_lin(theta, x) = f(theta0, x) + J(theta0, x) (theta - theta0)``, computed with one
    ``jax.jvp`` (a forward pass plus a Jacobian-vector product), so the Jacobian is never
    built. ``f_lin`` is exactly linear in ``theta`` and equals ``f`` at ``theta0``; its
    gradient with respect to ``theta`` is ``J(theta0, x)^T`` times the output cotangent.

    Args:
        network: a ``Network`` or a function ``f(params, x) -> outputs``.
        params0: the linearisation point, a pytree of the params' structure.

    Returns:
        ``f_lin(params, x) -> outputs`` of the same shape as ``f(params, x)``.
    """
    apply = _apply_fn(network)

    def f_lin(params, x):
        delta = jax.tree.map(jnp.subtract, params, params0)
        outputs0, tangent = jax.jvp(lambda p: apply(p, x), (params0,), (delta,))
        return outputs0 + tangent

    return f_lin


# --- Jacobian contraction ------------------------------------------------------------------
#
# The two stages below are separate jitted functions on purpose. On XLA:CPU (jax 0.10.2, the
# default CNN, 64 x 64 inputs) one jit over both fused the contraction with the Jacobian
# computation and ran about 1.5 times slower than two calls.


def _single_example(apply: ApplyFn) -> ApplyFn:
    """Wrap ``f`` for one example: (*input_shape) -> (C,), the outputs flattened."""

    def single(params, x):
        return apply(params, x[None]).reshape(-1)

    return single


@functools.partial(jax.jit, static_argnums=0)
def _jacobian_rows(apply: ApplyFn, params, x):
    """Compute per-example Jacobians, one (n, C, P_leaf) array per params leaf.

    Each example's C output rows come from C vector-Jacobian products at that example alone
    (``jax.jacrev`` of the single-example function under ``vmap``). The Jacobian of the
    whole batch would cost n times more, because each output row depends on one example.
    """
    jacobian = jax.vmap(jax.jacrev(_single_example(apply)), in_axes=(None, 0))(params, x)
    return [leaf.reshape(leaf.shape[0], leaf.shape[1], -1) for leaf in jax.tree.leaves(jacobian)]


@functools.partial(jax.jit, static_argnums=2)
def _contract(rows1, rows2, trace: bool):
    """Sum ``J1 J2^T`` over params leaves: (n1, n2, C, C), or (n1, n2) for ``trace``."""
    n1, n2, c = rows1[0].shape[0], rows2[0].shape[0], rows1[0].shape[1]
    if trace:
        # One matrix product per leaf over the flattened (output, parameter) axis.
        kernel = sum(a.reshape(n1, -1) @ b.reshape(n2, -1).T for a, b in zip(rows1, rows2))
        return kernel / c

    kernel = sum(a.reshape(n1 * c, -1) @ b.reshape(n2 * c, -1).T for a, b in zip(rows1, rows2))
    return kernel.reshape(n1, c, n2, c).transpose(0, 2, 1, 3)


# --- NTK-vector products --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ntk_vector_products(apply: ApplyFn, trace: bool, params, x1, x2):
    """Compute the empirical NTK by NTK-vector products ``Theta v = J(x1) (J(x2)^T v)``.

    ``v`` runs over the basis of the (n2, C) outputs at ``x2``. A basis vector touches one
    example, so ``J(x2)^T v`` is one vector-Jacobian product at that example. The
    Jacobian-vector product of that tangent with ``f(., x1)`` is one (n1, C) column block of
    the kernel. No Jacobian of ``x1`` is stored, which helps when there are many params.
    """
    single = _single_example(apply)
    num_outputs = jax.eval_shape(single, params, x2[0]).shape[0]
    basis = jnp.eye(num_outputs, dtype=x2.dtype)

    def column(x, cotangent):
        _, vjp = jax.vjp(lambda p: single(p, x), params)
        (tangent,) = vjp(cotangent)
        _, outputs = jax.jvp(lambda p: apply(p, x1), (params,), (tangent,))
        return outputs.reshape(x1.shape[0], -1)

    # columns[j, b] = Theta(x1, x2_j)[:, :, b], of shape (n1, C).
    columns = jax.vmap(lambda x: jax.vmap(lambda e: column(x, e))(basis))(x2)
    kernel = columns.transpose(2, 0, 3, 1)
    if trace:
        return jnp.mean(jnp.diagonal(kernel, axis1=2, axis2=3), axis=-1)
    return kernel


# --- Tiles ----------------------------------------------------------------------------------


def _split(x, tile: int) -> list[jax.Array]:
    """Split the batch axis into tiles of ``tile`` examples, zero-padding the last one.

    Equal tiles compile each stage once; the rows of the padding are dropped afterwards.
    """
    padding = -x.shape[0] % tile
    x = jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))
    return [x[start : start + tile] for start in range(0, x.shape[0], tile)]


def _kernel_blocks(apply, params, tiles1, tiles2, trace: bool, method: str, same: bool):
    """Compute the kernel block of every pair of tiles: a list of rows of blocks.

    For the Jacobian method, one tile's Jacobians of ``x1`` and one of ``x2`` are alive at a
    time, so memory is bounded by the tile size. The Jacobians of ``x2`` are recomputed for
    every tile of ``x1``; with ``same`` a diagonal block reuses the Jacobians of ``x1``.
    """
    blocks = []
    for i, tile1 in enumerate(tiles1):
        if method == "ntvp":
            blocks.append([_ntk_vector_products(apply, trace, params, tile1, t) for t in tiles2])
            continue

        rows1 = _jacobian_rows(apply, params, tile1)
        row = []
        for j, tile2 in enumerate(tiles2):
            rows2 = rows1 if same and i == j else _jacobian_rows(apply, params, tile2)
            row.append(_contract(rows1, rows2, trace))
        blocks.append(row)
    return blocks


# --- Public API -----------------------------------------------------------------------------


def _check_ntk_arguments(x1, x2, method: str, batch_size) -> None:
    if method not in NTK_METHODS:
        accepted = ", ".join(repr(m) for m in NTK_METHODS)
        raise ValueError(f"method must be one of {accepted}, got {method!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if x1.ndim < 1 or x2.ndim < 1 or x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must be batches of the same example shape, got shapes {x1.shape} and "
            f"{x2.shape}"
        )


def empirical_ntk(
    network: Network | ApplyFn,
    params,
    x1: jax.Array,
    x2: jax.Array | None = None,
    *,
    trace: bool = True,
    method: str = DEFAULT_NTK_METHOD,
    batch_size: int | None = None,
) -> jax.Array:
    """Compute the empirical neural tangent kernel ``J(x1) J(x2)^T`` at ``params``.

    ``Theta(x1_i, x2_j)[a, b] = sum_p d f_a(x1_i) / d theta_p * d f_b(x2_j) / d theta_p``,
    summed over every parameter (Jacot et al. 2018, arXiv:1806.07572). Outputs beyond the
    batch axis are flattened to C.

    Args:
        network: a ``Network`` or a function ``f(params, x) -> outputs`` whose outputs for
            each example depend on that example alone.
        params: the point at which the Jacobians are taken.
        x1: inputs (n1, *input_shape).
        x2: inputs (n2, *input_shape); ``None`` or ``x1`` itself computes each Jacobian once.
        trace: ``True`` returns the (n1, n2) kernel traced over the outputs, defined as the
            MEAN over the output axis, ``(1/C) sum_a Theta[a, a]`` (the convention of
            neural-tangents' ``trace_axes``), so ``C`` times it is the trace of the full
            kernel. ``False`` returns the full (n1, n2, C, C) kernel.
        method: ``"jacobian"`` computes per-example Jacobians by reverse mode, then one
            matrix product per params leaf (the faster method for the default CNN).
            ``"ntvp"`` computes NTK-vector products ``J(x1) (J(x2)^T v)`` by ``vjp`` then
            ``jvp`` and stores no Jacobian of ``x1``.
        batch_size: tile size over ``x1`` and ``x2``; ``None`` computes all at once. Tiles
            bound the memory (one tile of Jacobians at a time) and give the same kernel.

    The stages are compiled once per function and tile shape. Pass the same ``Network`` or
    function object on every call to reuse the compilations.

    Returns:
        (n1, n2) if ``trace`` else (n1, n2, C, C).

    Example:
        >>> import jax
        >>> from bpalt import models, ntk
        >>> network = models.digits_cnn()
        >>> params = network.init(jax.random.key(0))
        >>> x = jax.numpy.ones((4, 8, 8, 1))
        >>> ntk.empirical_ntk(network, params, x).shape
        (4, 4)
    """
    apply = _apply_fn(network)
    same = x2 is None or x2 is x1
    x2 = x1 if x2 is None else x2
    _check_ntk_arguments(x1, x2, method, batch_size)

    tiles1 = _split(x1, min(batch_size or x1.shape[0], x1.shape[0]))
    tiles2 = tiles1 if same else _split(x2, min(batch_size or x2.shape[0], x2.shape[0]))
    blocks = _kernel_blocks(apply, params, tiles1, tiles2, trace, method, same)
    if len(blocks) == 1 and len(blocks[0]) == 1:
        return blocks[0][0][: x1.shape[0], : x2.shape[0]]
    kernel = jnp.concatenate([jnp.concatenate(row, axis=1) for row in blocks], axis=0)
    return kernel[: x1.shape[0], : x2.shape[0]]


# --- Gradient descent on the squared error in closed form -----------------------------------


def _flatten_kernel(kernel, n: int, num_outputs: int):
    """Reshape a (n, m, C, C) kernel to (n C, m C); return a (n, m) kernel unchanged."""
    if kernel.ndim == 2:
        return kernel
    m = kernel.shape[1]
    return kernel.transpose(0, 2, 1, 3).reshape(n * num_outputs, m * num_outputs)


def _check_mse_shapes(ntk_train_train, y_train, fx_train_0, ntk_test_train, fx_test_0):
    n = y_train.shape[0]
    if y_train.ndim != 2 or fx_train_0.shape != y_train.shape:
        raise ValueError(
            f"y_train and fx_train_0 must both be (n, C), got {y_train.shape} and "
            f"{fx_train_0.shape}"
        )
    c = y_train.shape[1]
    if ntk_train_train.shape not in ((n, n), (n, n, c, c)):
        raise ValueError(
            f"ntk_train_train must be ({n}, {n}) or ({n}, {n}, {c}, {c}), got "
            f"{ntk_train_train.shape}"
        )
    if (ntk_test_train is None) != (fx_test_0 is None):
        raise ValueError("give both ntk_test_train and fx_test_0, or neither")
    if ntk_test_train is not None:
        m = fx_test_0.shape[0]
        expected = (m, n) if ntk_train_train.ndim == 2 else (m, n, c, c)
        if ntk_test_train.shape != expected or fx_test_0.shape != (m, c):
            raise ValueError(
                f"ntk_test_train must be {expected} with fx_test_0 ({m}, {c}), got "
                f"{ntk_test_train.shape} and {fx_test_0.shape}"
            )


def predict_mse(
    ntk_train_train: jax.Array,
    y_train: jax.Array,
    fx_train_0: jax.Array,
    t=None,
    *,
    learning_rate: float = 1.0,
    ntk_test_train: jax.Array | None = None,
    fx_test_0: jax.Array | None = None,
    diag_reg: float = 0.0,
):
    """Outputs of the linearised network after gradient flow on the squared error.

    The loss is bpalt's ``mean_squared_error``, ``L = 1/(2n) sum_i ||f(x_i) - y_i||^2`` over
    the n training examples, and the params follow the gradient flow
    ``d theta / dt = -learning_rate * grad L``, the limit of gradient descent with step
    ``learning_rate`` as the step shrinks, so ``t`` counts steps. For the linearised network
    the training outputs then obey ``d f / dt = -(learning_rate / n) Theta (f - y)``, with
    ``Theta`` the NTK on the training set at the initial params (Lee et al. 2019,
    arXiv:1902.06720). With the eigendecomposition ``Theta = V diag(lambda) V^T`` (negative
    eigenvalues, which only rounding produces, clipped to zero) and ``s = learning_rate t / n``:

        f_t(x) = f_0(x) + Theta(x, X) V diag((1 - exp(-s lambda)) / lambda) V^T (y - f_0(X))

    for a test input ``x``; on the training inputs this is
    ``f_t(X) = y + V diag(exp(-s lambda)) V^T (f_0(X) - y)``. At ``t = inf`` it is kernel
    regression on the residual, ``f_0(x) + Theta(x, X) Theta^+ (y - f_0(X))``, and the
    training outputs reach ``y`` wherever ``Theta`` is non-singular. Eigenvalues below a
    relative tolerance count as zero.

    A traced (n, n) kernel ``K`` is used as ``K`` times the C x C identity: every output
    column trains independently with the same kernel, exact when the full kernel has that
    form and otherwise an approximation.

    Args:
        ntk_train_train: (n, n, C, C) full or (n, n) traced NTK on the training inputs.
        y_train: (n, C) float targets (one-hot for classes).
        fx_train_0: (n, C) outputs on the training inputs at the initial params.
        t: training time in steps of size ``learning_rate``; ``None`` or ``inf`` for the
            limit. A scalar, possibly traced.
        learning_rate: the gradient-descent learning rate.
        ntk_test_train: (m, n, C, C) or (m, n) NTK between test and training inputs.
        fx_test_0: (m, C) outputs on the test inputs at the initial params.
        diag_reg: adds ``diag_reg`` times the mean diagonal entry of ``Theta`` to its
            diagonal in the dynamics (at ``t = inf``, kernel ridge regression); 0 for plain
            gradient flow. The training outputs are still ``Theta(X, X)`` times the
            regression coefficients, so with ``diag_reg > 0`` they no longer reach ``y``.

    Returns:
        ``fx_train_t`` (n, C), or ``(fx_train_t, fx_test_t)`` when test inputs are given.
    """
    _check_mse_shapes(ntk_train_train, y_train, fx_train_0, ntk_test_train, fx_test_0)
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate!r}")
    if not diag_reg >= 0:
        raise ValueError(f"diag_reg must be non-negative, got {diag_reg!r}")
    n, c = y_train.shape
    traced = ntk_train_train.ndim == 2

    # Columns are output channels for a traced kernel, one vector of n C entries otherwise.
    residual = y_train - fx_train_0
    residual = residual if traced else residual.reshape(n * c, 1)
    kernel = _flatten_kernel(ntk_train_train, n, c)
    ridge = diag_reg * jnp.mean(jnp.diagonal(kernel))

    eigenvalues, eigenvectors = jnp.linalg.eigh(kernel + ridge * jnp.eye(kernel.shape[0]))
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    tolerance = eigenvalues.max() * kernel.shape[0] * jnp.finfo(kernel.dtype).eps
    positive = eigenvalues > tolerance
    safe = jnp.where(positive, eigenvalues, 1.0)

    # Flow time s = learning_rate t / n; t = inf gives the gain 1 / lambda.
    t = jnp.inf if t is None else t
    time = (learning_rate / n) * jnp.asarray(t, kernel.dtype)
    # (1 - exp(-s lambda)) / lambda, with its limit s at lambda = 0. Null directions of Theta
    # are orthogonal to Theta(x, X) in exact arithmetic; at t = inf their gain is set to 0.
    null_gain = jnp.where(jnp.isinf(time), 0.0, time)
    gain = jnp.where(positive, -jnp.expm1(-time * safe) / safe, null_gain)

    # Theta(X, X) = V diag(lambda - ridge) V^T, applied in the eigenbasis for stability.
    coefficients = gain[:, None] * (eigenvectors.T @ residual)
    train_gain = (eigenvalues - ridge)[:, None] * coefficients
    fx_train_t = fx_train_0 + (eigenvectors @ train_gain).reshape(n, c)
    if ntk_test_train is None:
        return fx_train_t

    m = fx_test_0.shape[0]
    cross = _flatten_kernel(ntk_test_train, m, c)
    fx_test_t = fx_test_0 + (cross @ (eigenvectors @ coefficients)).reshape(m, c)
    return fx_train_t, fx_test_t
