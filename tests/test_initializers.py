"""Initializer statistics on large samples, fan computation and argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bpalt import initializers

KEY = jax.random.key(0)
DENSE = (400, 600)  # fan_in 400, fan_out 600: 240,000 samples
CONV = (3, 5, 40, 24)  # fan_in 3*5*40 = 600, fan_out 3*5*24 = 360: 14,400 samples

# Relative error of the sample variance is about sqrt(2 / n) for a normal sample, under
# 0.3 % for DENSE and 1.2 % for CONV, so 5 % can only fail on a wrong formula.
VARIANCE_RTOL = 0.05


def _sample(init, shape):
    return np.asarray(init(KEY, shape), np.float64)


@pytest.mark.parametrize(
    "shape,fans",
    [
        ((7, 3), (7, 3)),
        ((3, 3, 16, 32), (3 * 3 * 16, 3 * 3 * 32)),
        ((5, 2, 4, 6), (5 * 2 * 4, 5 * 2 * 6)),
        ((1, 1, 8, 2), (8, 2)),
        ((9,), (9, 9)),
    ],
)
def test_compute_fans(shape, fans):
    assert initializers.compute_fans(shape) == fans


def test_compute_fans_scalar_raises():
    with pytest.raises(ValueError, match="scalar shape"):
        initializers.compute_fans(())


@pytest.mark.parametrize(
    "name,variance_fn",
    [
        ("he_normal", lambda fan_in, fan_out: 2.0 / fan_in),
        ("he_uniform", lambda fan_in, fan_out: 2.0 / fan_in),
        ("xavier_normal", lambda fan_in, fan_out: 2.0 / (fan_in + fan_out)),
        ("xavier_uniform", lambda fan_in, fan_out: 2.0 / (fan_in + fan_out)),
        ("lecun_normal", lambda fan_in, fan_out: 1.0 / fan_in),
    ],
)
@pytest.mark.parametrize("shape,fans", [(DENSE, (400, 600)), (CONV, (600, 360))])
def test_variance_scaling_variance(name, variance_fn, shape, fans):
    sample = _sample(initializers.get(name), shape)
    expected = variance_fn(*fans)
    assert sample.shape == shape
    assert sample.var() == pytest.approx(expected, rel=VARIANCE_RTOL)
    assert abs(sample.mean()) < 5 * math.sqrt(expected / sample.size)


@pytest.mark.parametrize(
    "name,bound_fn",
    [
        ("he_uniform", lambda fan_in, fan_out: math.sqrt(6.0 / fan_in)),
        ("xavier_uniform", lambda fan_in, fan_out: math.sqrt(6.0 / (fan_in + fan_out))),
    ],
)
@pytest.mark.parametrize("shape,fans", [(DENSE, (400, 600)), (CONV, (600, 360))])
def test_uniform_scaling_bounds(name, bound_fn, shape, fans):
    sample = _sample(initializers.get(name), shape)
    bound = bound_fn(*fans)
    assert sample.max() <= bound
    assert sample.min() >= -bound
    assert sample.max() > 0.99 * bound
    assert sample.min() < -0.99 * bound


def test_normal_initializers_are_gaussian():
    # The fourth standardized moment is 3 for a Gaussian but 1.8 for a uniform distribution.
    sample = _sample(initializers.he_normal(), DENSE)
    standardized = sample / sample.std()
    assert abs((standardized**4).mean() - 3.0) < 0.1


def test_normal_stddev_and_mean():
    sample = _sample(initializers.normal(stddev=0.3, mean=1.5), DENSE)
    assert sample.std() == pytest.approx(0.3, rel=0.02)
    assert sample.mean() == pytest.approx(1.5, abs=0.01)


def test_normal_default_stddev():
    sample = _sample(initializers.get("normal"), DENSE)
    assert sample.std() == pytest.approx(0.01, rel=0.02)


def test_uniform_bounds_and_variance():
    low, high = -0.2, 0.6
    sample = _sample(initializers.uniform(low, high), DENSE)
    assert sample.min() >= low
    assert sample.max() < high
    assert sample.min() < low + 0.01
    assert sample.max() > high - 0.01
    assert sample.var() == pytest.approx((high - low) ** 2 / 12, rel=VARIANCE_RTOL)


def test_zeros():
    values = initializers.zeros(KEY, (3, 4))
    assert values.shape == (3, 4)
    assert values.dtype == jnp.float32
    assert not np.any(np.asarray(values))


def test_constant():
    values = initializers.get("constant", value=0.25)(KEY, (2, 5))
    np.testing.assert_array_equal(values, np.full((2, 5), 0.25, np.float32))


def test_constant_by_name_needs_value():
    with pytest.raises(ValueError, match="initializer 'constant' needs a value"):
        initializers.get("constant")


@pytest.mark.parametrize("name", [{"value": 1.0}, ["constant"], 3])
def test_initializer_not_name_or_function(name):
    with pytest.raises(ValueError, match="an initializer must be a name or a function"):
        initializers.get(name)


def test_dtype_argument():
    values = initializers.he_normal()(KEY, (4, 4), jnp.bfloat16)
    assert values.dtype == jnp.bfloat16


def test_same_key_same_values():
    first = initializers.xavier_normal()(KEY, (5, 6))
    second = initializers.xavier_normal()(KEY, (5, 6))
    np.testing.assert_array_equal(first, second)


def test_get_by_name_matches_factory():
    np.testing.assert_array_equal(
        initializers.get("he_uniform")(KEY, (5, 6)), initializers.he_uniform()(KEY, (5, 6))
    )


def test_get_passes_callable_through():
    assert initializers.get(initializers.zeros) is initializers.zeros


def test_get_unknown_name_raises():
    with pytest.raises(ValueError, match="unknown initializer 'kaiming'.*he_normal"):
        initializers.get("kaiming")


def test_normal_negative_stddev_raises():
    with pytest.raises(ValueError, match="stddev must be >= 0, got -1"):
        initializers.normal(stddev=-1.0)


def test_uniform_empty_interval_raises():
    with pytest.raises(ValueError, match="high > low"):
        initializers.uniform(low=0.5, high=0.5)


def test_variance_scaling_bad_mode_raises():
    with pytest.raises(ValueError, match="mode must be .*'fan_sum'"):
        initializers.variance_scaling(1.0, "fan_sum", "normal")


def test_variance_scaling_bad_distribution_raises():
    with pytest.raises(ValueError, match="distribution must be .*'laplace'"):
        initializers.variance_scaling(1.0, "fan_in", "laplace")
