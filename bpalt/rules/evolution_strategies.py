"""Evolution strategies (Salimans et al. 2017, arXiv:1703.03864)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bpalt import losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule, check_choice, check_positive
from bpalt.rules.registry import register

SHAPINGS = ("centred_rank", "standardised", "none")
POPULATION_AXIS = "population"


class EvolutionStrategiesState(NamedTuple):
    """State of evolution strategies.

    Attributes:
        step: int32 scalar, the number of updates taken; ``sigma_schedule`` reads it. The
            perturbations are not stored: each step draws them again from its ``key``.
    """

    step: jax.Array


# --- Fitness shaping ------------------------------------------------------------------------


def centred_ranks(losses: jax.Array) -> jax.Array:
    """Compute centred ranks of ``losses`` (n,): the lowest loss gets -0.5, the highest +0.5.

    Ranks are evenly spaced, ``rank / (n - 1) - 0.5``, so the shaped values do not depend on
    the scale of the loss and an outlier cannot dominate the estimate. Non-finite losses
    (NaN or +-inf) rank as the worst, with ties broken by position.
    """
    worst_first = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    ranks = jnp.argsort(jnp.argsort(worst_first, stable=True), stable=True)
    return ranks.astype(losses.dtype) / (losses.shape[0] - 1) - 0.5


def _finite_or_worst(losses: jax.Array) -> jax.Array:
    """Replace non-finite losses by the largest finite one (0 if none is finite)."""
    finite = jnp.isfinite(losses)
    worst = jnp.max(jnp.where(finite, losses, -jnp.inf))
    worst = jnp.where(jnp.isfinite(worst), worst, 0.0)
    return jnp.where(finite, losses, worst)


def shape_fitness(losses: jax.Array, shaping: str) -> jax.Array:
    """Shape a population's losses (n,) into fitness, larger for worse members.

    ``"centred_rank"``: ``centred_ranks``. ``"standardised"``: ``(L - mean) / std``.
    ``"none"``: the losses themselves, which makes the antithetic estimate an unbiased
    estimate of the gradient of the Gaussian-smoothed loss. For the last two, non-finite
    losses are replaced by the largest finite loss.
    """
    if shaping == "centred_rank":
        return centred_ranks(losses)
    losses = _finite_or_worst(losses)
    if shaping == "standardised":
        return (losses - losses.mean()) / (losses.std() + jnp.finfo(losses.dtype).tiny)
    return losses


# --- The estimate on one device or on a slice of the population ----------------------------


def perturbation(key: jax.Array, pair: jax.Array, dim: int, dtype) -> jax.Array:
    """Draw the standard normal direction ``eps_k`` (dim,) of antithetic pair ``k``.

    The draw uses ``fold_in(key, k)``, so it depends on the pair index alone. Any device and
    any chunk therefore regenerates the same noise without storing it.
    """
    return jax.random.normal(jax.random.fold_in(key, pair), (dim,), dtype)


def _pair_losses(loss_fn, theta, key, sigma, pairs, pairs_per_chunk):
    """Losses (len(pairs), 2) at ``theta + sigma eps_k`` and ``theta - sigma eps_k``.

    ``lax.map`` walks over the pairs and evaluates ``pairs_per_chunk`` of them at once under
    ``vmap``. On XLA:CPU this ran about 4 times faster than one ``vmap`` over the whole
    population of a convolutional network, and its memory stays bounded by the chunk.
    """

    def one_pair(pair):
        eps = perturbation(key, pair, theta.shape[0], theta.dtype)
        members = theta[None, :] + sigma * jnp.stack([eps, -eps])
        return jax.vmap(loss_fn)(members)

    return lax.map(one_pair, pairs, batch_size=pairs_per_chunk)


def _weighted_perturbation_sum(key, pairs, weights, dim, dtype, pairs_per_chunk):
    """``sum_k weights_k eps_k`` (dim,), regenerating ``pairs_per_chunk`` directions at once."""
    num_chunks = -(-pairs.shape[0] // pairs_per_chunk)
    padding = num_chunks * pairs_per_chunk - pairs.shape[0]

    # Padded entries reuse pair 0 with weight 0, so they add nothing.
    pairs = jnp.pad(pairs, (0, padding)).reshape(num_chunks, pairs_per_chunk)
    weights = jnp.pad(weights, (0, padding)).reshape(num_chunks, pairs_per_chunk)

    def one_chunk(chunk):
        chunk_pairs, chunk_weights = chunk
        eps = jax.vmap(lambda pair: perturbation(key, pair, dim, dtype))(chunk_pairs)
        return chunk_weights @ eps

    return lax.map(one_chunk, (pairs, weights)).sum(axis=0)


def _estimate_flat(
    loss_fn, theta, key, sigma, pairs, *, num_pairs, shaping, pairs_per_chunk, axis_name
):
    """ES estimate for a flat ``theta`` from the antithetic pairs with indices ``pairs``.

    With ``axis_name`` set, ``pairs`` is this device's slice of the (padded) pair indices:
    the losses are gathered from all devices, every device shapes the same fitness, and the
    partial sums of ``weights_k eps_k`` are added across devices. Indices ``>= num_pairs``
    are padding and get weight 0.

    Returns:
        ``(estimate (dim,), losses (len(pairs), 2))``: the losses of this slice's pairs.
    """
    local_losses = _pair_losses(loss_fn, theta, key, sigma, pairs, pairs_per_chunk)
    losses = local_losses
    if axis_name is not None:
        losses = lax.all_gather(local_losses, axis_name, tiled=True)
    losses = losses[:num_pairs]

    # Member 2k is theta + sigma eps_k and member 2k + 1 is theta - sigma eps_k.
    fitness = shape_fitness(losses.reshape(-1), shaping).reshape(num_pairs, 2)
    population = 2 * num_pairs
    pair_weights = (fitness[:, 0] - fitness[:, 1]) / (population * sigma)
    if axis_name is None:
        weights = pair_weights
    else:
        weights = jnp.where(pairs < num_pairs, pair_weights[jnp.minimum(pairs, num_pairs - 1)], 0)

    estimate = _weighted_perturbation_sum(
        key, pairs, weights, theta.shape[0], theta.dtype, pairs_per_chunk
    )
    if axis_name is not None:
        estimate = lax.psum(estimate, axis_name)
    return estimate, local_losses


def _check_estimator_arguments(population, shaping, chunk_size) -> None:
    check_positive("population", population, integer=True)
    if population < 2 or population % 2:
        raise ValueError(
            f"population must be an even integer >= 2 (antithetic pairs), got {population!r}"
        )
    check_choice("shaping", shaping, SHAPINGS)
    check_positive("chunk_size", chunk_size, integer=True)
    if chunk_size < 2 or chunk_size % 2:
        raise ValueError(
            f"chunk_size must be an even integer >= 2 (whole antithetic pairs), got {chunk_size!r}"
        )


def population_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """Build a one-axis mesh over ``devices`` (default: all); return None for one device."""
    if devices is not None and (
        isinstance(devices, (str, bytes))
        or not isinstance(devices, Sequence)
        or not all(isinstance(device, jax.Device) for device in devices)
    ):
        raise ValueError(
            f"devices must be a sequence of jax.Device objects (e.g. jax.devices()), got "
            f"{devices!r}"
        )
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty sequence")
    if len(devices) == 1:
        return None
    return Mesh(np.array(devices), (POPULATION_AXIS,))


def es_gradient(
    loss_fn: Callable,
    params,
    key: jax.Array,
    *,
    population: int,
    sigma,
    shaping: str = "centred_rank",
    chunk_size: int = 8,
    mesh: Mesh | None = None,
):
    """Estimate the gradient of ``loss_fn`` at ``params`` by antithetic evolution strategies.

    With ``theta`` the params as one vector (``ravel_pytree``), ``n = population`` members
    ``theta +- sigma eps_k`` for ``k < n/2`` and ``eps_k ~ N(0, I)``, and ``F_i`` the shaped
    fitness of member ``i``'s loss (``shape_fitness``, larger for a larger loss):

        g = 1 / (n sigma) sum_i F_i eps_i = 1 / (n sigma) sum_k (F_{k+} - F_{k-}) eps_k.

    Sign convention: the fitness is the loss and ES here minimises it, so ``g`` points
    uphill like a gradient (fitness ``-loss`` with ascent gives the same step), and an optax
    optimizer descends along it. With ``shaping="none"``, ``E[g]`` is the gradient of the
    smoothed loss ``E[loss(theta + sigma eps)]``, which is ``grad loss`` on a quadratic.

    Args:
        loss_fn: ``loss_fn(params) -> scalar``.
        params: the point, any pytree of float arrays.
        key: the perturbations ``eps_k`` are drawn from ``fold_in(key, k)``.
        population: ``n``, even.
        sigma: the perturbation scale, a positive scalar (may be traced).
        shaping: ``"centred_rank"``, ``"standardised"`` or ``"none"``.
        chunk_size: members evaluated at once per device, even.
        mesh: a one-axis ``Mesh`` (axis ``"population"``) to split the pairs across its
            devices; the estimate equals the single-device one up to summation order.

    Returns:
        ``(g, losses)``: ``g`` with the structure of ``params``; ``losses`` (n,) the members'
        losses, member ``2k`` at ``+eps_k`` and ``2k + 1`` at ``-eps_k``.
    """
    _check_estimator_arguments(population, shaping, chunk_size)
    theta, unravel = ravel_pytree(params)
    num_pairs = population // 2
    pairs_per_chunk = max(min(chunk_size // 2, num_pairs), 1)
    sigma = jnp.asarray(sigma, theta.dtype)
    settings = dict(num_pairs=num_pairs, shaping=shaping, pairs_per_chunk=pairs_per_chunk)

    def flat_loss(vector):
        return loss_fn(unravel(vector))

    if mesh is None:
        estimate, losses = _estimate_flat(
            flat_loss, theta, key, sigma, jnp.arange(num_pairs), axis_name=None, **settings
        )
        return unravel(estimate), losses.reshape(-1)

    # Pad the pairs to a multiple of the device count; each device gets an equal slice.
    num_devices = mesh.devices.size
    padded_pairs = -(-num_pairs // num_devices) * num_devices
    pairs_per_chunk = max(min(pairs_per_chunk, padded_pairs // num_devices), 1)
    settings["pairs_per_chunk"] = pairs_per_chunk

    def on_device(theta, key, sigma, pairs):
        return _estimate_flat(
            flat_loss, theta, key, sigma, pairs, axis_name=POPULATION_AXIS, **settings
        )

    sharded = jax.shard_map(
        on_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(POPULATION_AXIS)),
        out_specs=(P(), P(POPULATION_AXIS)),
    )
    estimate, losses = sharded(theta, key, sigma, jnp.arange(padded_pairs))
    return unravel(estimate), losses[:num_pairs].reshape(-1)


# --- The update rule ------------------------------------------------------------------------


def _check_arguments(population, sigma, sigma_schedule, shaping, chunk_size, weight_decay):
    _check_estimator_arguments(population, shaping, chunk_size)
    check_positive("sigma", sigma)
    if sigma_schedule is not None:
        if not callable(sigma_schedule):
            raise ValueError(
                f"sigma_schedule must be a function step -> sigma or None, got {sigma_schedule!r}"
            )
        first = float(sigma_schedule(0))
        if not (first > 0 and math.isfinite(first)):
            raise ValueError(f"sigma_schedule(0) must be finite and positive, got {first!r}")
    is_number = isinstance(weight_decay, numbers.Real) and not isinstance(weight_decay, bool)
    if not (is_number and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(
            f"weight_decay must be a finite non-negative number, got {weight_decay!r}"
        )


# On digits with the default CNN these settings reached 95.5 % mean test accuracy over seeds
# 0-2 (2-core CPU, jax 0.10.2). A step evaluates population x batch examples, so an epoch costs
# population x training-set size whatever the batch, and a small batch buys more steps.
@register(
    "es",
    training={"epochs": 40, "batch_size": 32, "optimizer": "adam", "learning_rate": 3e-3},
)
def evolution_strategies(
    network: Network,
    loss=losses.softmax_cross_entropy,
    *,
    population: int = 128,
    sigma: float = 0.02,
    sigma_schedule: Callable | None = None,
    shaping: str = "centred_rank",
    chunk_size: int = 8,
    weight_decay: float = 0.0,
    devices: Sequence[jax.Device] | None = None,
) -> UpdateRule:
    """Evolution strategies: a gradient estimate from the losses of perturbed copies.

    Each step perturbs the whole parameter vector with ``population / 2`` antithetic pairs
    ``theta +- sigma eps_k``, evaluates every member's loss on the batch, shapes the losses
    into fitness and returns ``grads = es_gradient(...) + weight_decay * theta`` (see
    ``es_gradient`` for the estimate and its sign convention). ``grads`` is an estimate of
    the gradient of the Gaussian-smoothed loss, not the loss gradient, and no backward pass
    is taken. After fitness shaping only its direction is meaningful, not its norm. Noise
    comes from the step's ``key`` and is drawn again when needed, never stored per member.
    With several devices, the pairs are split across them with ``shard_map`` and the
    estimate is the same as on one device.

    Args:
        network: the network; ES sees ``network.apply`` as one function.
        loss: ``loss(logits, labels) -> scalar``.
        population: members per step, even; each costs one forward pass on the batch.
        sigma: the perturbation scale.
        sigma_schedule: optional function ``step -> sigma`` (an optax schedule works),
            evaluated on the step count; replaces ``sigma`` when given.
        shaping: ``"centred_rank"`` (non-finite losses rank worst), ``"standardised"``, or
            ``"none"`` for the unbiased raw estimate.
        chunk_size: members evaluated at once per device. On a 2-core CPU, chunks of 4 to 8
            members ran fastest for the default CNN, several times faster than 128 when the
            step is vmapped over seeds, because the chunk's activations stay in cache.
        weight_decay: L2 coefficient added to the estimate as ``weight_decay * theta``.
        devices: devices to split the population across; default all of ``jax.devices()``.

    Returns:
        An ``UpdateRule`` with state ``EvolutionStrategiesState``. Metrics: ``loss`` at the
        unperturbed params (one extra forward pass), ``population_loss`` the mean loss of
        the members, and ``sigma``.
    """
    _check_arguments(population, sigma, sigma_schedule, shaping, chunk_size, weight_decay)
    mesh = population_mesh(devices)

    def current_sigma(step):
        if sigma_schedule is None:
            return jnp.asarray(sigma, jnp.float32)
        return jnp.asarray(sigma_schedule(step), jnp.float32)

    def init(key, params):
        del key, params
        return EvolutionStrategiesState(step=jnp.array(0, jnp.int32))

    def update(state, params, batch, key):
        x, y = batch

        def batch_loss(candidate):
            return loss(network.apply(candidate, x), y)

        step_sigma = current_sigma(state.step)
        estimate, member_losses = es_gradient(
            batch_loss,
            params,
            key,
            population=population,
            sigma=step_sigma,
            shaping=shaping,
            chunk_size=chunk_size,
            mesh=mesh,
        )
        grads = jax.tree.map(lambda g, p: g + weight_decay * p, estimate, params)

        metrics = {
            "loss": batch_loss(params),
            "population_loss": member_losses.mean(),
            "sigma": step_sigma,
        }
        return grads, EvolutionStrategiesState(step=state.step + 1), metrics

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="es")
