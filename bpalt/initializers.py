"""Weight initializers: zeros, constant, normal, uniform, He, Xavier and LeCun.

An initializer is a function ``init(key, shape, dtype=jnp.float32) -> array``. The
variance-scaling ones read the fans from the shape: a dense weight is ``(in, out)`` and a
convolution kernel is HWIO ``(height, width, in, out)``, so

    fan_in  = height * width * in
    fan_out = height * width * out

because each output unit of a convolution sums over a receptive field of
``height * width * in`` inputs.

References:
    He et al. 2015, "Delving Deep into Rectifiers", arXiv:1502.01852 (variance 2 / fan_in).
    Glorot and Bengio 2010, "Understanding the difficulty of training deep feedforward
    neural networks", AISTATS (variance 2 / (fan_in + fan_out)).
    LeCun et al. 1998, "Efficient BackProp" (variance 1 / fan_in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def compute_fans(shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` of a dense ``(in, out)`` or HWIO kernel shape."""
    shape = tuple(shape)
    if len(shape) < 1:
        raise ValueError(f"cannot compute fans of a scalar shape {shape}; pass a weight shape")
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def zeros(key, shape, dtype=jnp.float32):
    """Fill with zeros. Every unit of a layer then computes the same function (symmetry)."""
    del key
    return jnp.zeros(shape, dtype)


def constant(value: float) -> Initializer:
    """Return an initializer that fills with ``value``."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init


def normal(stddev: float = 0.01, mean: float = 0.0) -> Initializer:
    """Return an initializer drawing from N(mean, stddev^2)."""
    if stddev < 0:
        raise ValueError(f"stddev must be >= 0, got {stddev}")

    def init(key, shape, dtype=jnp.float32):
        return mean + stddev * jax.random.normal(key, shape, dtype)

    return init


def uniform(low: float = -0.05, high: float = 0.05) -> Initializer:
    """Return an initializer drawing from U[low, high)."""
    if not high > low:
        raise ValueError(f"uniform needs high > low, got low={low}, high={high}")

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=low, maxval=high)

    return init


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """Return an initializer with variance ``scale / fan``.

    Args:
        scale: numerator of the variance.
        mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"`` (the mean of both fans).
        distribution: ``"normal"`` (Gaussian, not truncated) or ``"uniform"``
            (U[-a, a] with a = sqrt(3 * variance)).
    """
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(f"distribution must be 'normal' or 'uniform', got {distribution!r}")

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = compute_fans(shape)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / fan

        if distribution == "normal":
            return math.sqrt(variance) * jax.random.normal(key, shape, dtype)
        limit = math.sqrt(3.0 * variance)
        return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)

    return init


def he_normal() -> Initializer:
    """He (Kaiming) normal: N(0, 2 / fan_in), for ReLU networks (arXiv:1502.01852)."""
    return variance_scaling(2.0, "fan_in", "normal")


def he_uniform() -> Initializer:
    """He (Kaiming) uniform: U[-a, a] with a = sqrt(6 / fan_in)."""
    return variance_scaling(2.0, "fan_in", "uniform")


def xavier_normal() -> Initializer:
    """Xavier (Glorot) normal: N(0, 2 / (fan_in + fan_out)), for tanh and sigmoid."""
    return variance_scaling(1.0, "fan_avg", "normal")


def xavier_uniform() -> Initializer:
    """Xavier (Glorot) uniform: U[-a, a] with a = sqrt(6 / (fan_in + fan_out))."""
    return variance_scaling(1.0, "fan_avg", "uniform")


def lecun_normal() -> Initializer:
    """LeCun normal: N(0, 1 / fan_in)."""
    return variance_scaling(1.0, "fan_in", "normal")


_BY_NAME: dict[str, Callable[[], Initializer]] = {
    "zeros": lambda: zeros,
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
    "lecun_normal": lecun_normal,
}


def get(name: str | Initializer, **kwargs) -> Initializer:
    """Return the initializer called ``name`` (or ``name`` itself if it is callable).

    ``"normal"``, ``"uniform"`` and ``"constant"`` take their keyword arguments
    (``stddev``, ``low``/``high``, ``value``).
    """
    if callable(name):
        return name
    if not isinstance(name, str):
        raise ValueError(f"an initializer must be a name or a function, got {name!r}")
    if name == "normal":
        return normal(**kwargs)
    if name == "uniform":
        return uniform(**kwargs)
    if name == "constant":
        if "value" not in kwargs:
            # A config file gives a name only, with no way to pass the value.
            raise ValueError(
                "initializer 'constant' needs a value: pass initializers.constant(value) "
                "from Python, or use 'zeros'"
            )
        return constant(**kwargs)
    if name not in _BY_NAME:
        accepted = sorted([*_BY_NAME, "normal", "uniform", "constant"])
        raise ValueError(f"unknown initializer {name!r}; accepted: {', '.join(accepted)}")
    return _BY_NAME[name]()
