"""Evolution strategies: the estimate against ``jax.grad`` on quadratics, fitness shaping,
the rule's outputs, and the population sharded over four host devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpalt import losses, models, rules, train
from bpalt.rules.evolution_strategies import centred_ranks, es_gradient, shape_fitness

REPOSITORY = Path(__file__).resolve().parents[1]


def _quadratic(dim, seed=0):
    """``L(w) = 0.5 w^T A w + b^T w`` with A positive definite, and a point ``w``.

    The loss function carries its minimiser ``-A^{-1} b`` as the attribute ``minimiser``.
    """
    keys = jax.random.split(jax.random.key(seed), 3)
    factor = jax.random.normal(keys[0], (dim, dim))
    matrix = factor @ factor.T / dim + jnp.eye(dim)
    offset = jax.random.normal(keys[1], (dim,))

    def loss(params):
        w = params["w"]
        return 0.5 * w @ matrix @ w + offset @ w

    loss.minimiser = {"w": -jnp.linalg.solve(matrix, offset)}
    return loss, {"w": jax.random.normal(keys[2], (dim,))}


def _cosine(a, b):
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _estimate(loss, params, key, **settings):
    run = jax.jit(lambda k: es_gradient(loss, params, k, **settings))
    estimate, member_losses = run(key)
    return estimate, member_losses


# --- Fitness shaping ------------------------------------------------------------------------


def test_centred_ranks_hand_example():
    member_losses = jnp.array([3.0, jnp.nan, 1.0, 2.0, -jnp.inf])
    # Finite losses ranked 2, 0, 1; NaN and -inf rank worst, in order of position.
    expected = np.array([2, 3, 0, 1, 4]) / 4 - 0.5
    np.testing.assert_allclose(centred_ranks(member_losses), expected, atol=1e-7)


def test_centred_rank_ignores_monotone_transform():
    member_losses = jax.random.normal(jax.random.key(1), (64,))
    np.testing.assert_allclose(
        shape_fitness(jnp.exp(member_losses), "centred_rank"),
        shape_fitness(member_losses, "centred_rank"),
        atol=1e-7,
    )


def test_standardised_shaping_ignores_affine_transform():
    member_losses = jax.random.normal(jax.random.key(2), (64,))
    standardised = shape_fitness(member_losses, "standardised")
    np.testing.assert_allclose(
        shape_fitness(3.0 * member_losses + 5.0, "standardised"), standardised, atol=1e-5
    )
    np.testing.assert_allclose(float(standardised.mean()), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(standardised.std()), 1.0, rtol=1e-5)


def test_unshaped_fitness_replaces_non_finite_by_worst():
    member_losses = jnp.array([1.0, jnp.nan, 3.0, jnp.inf, 2.0])
    np.testing.assert_allclose(shape_fitness(member_losses, "none"), [1.0, 3.0, 3.0, 3.0, 2.0])


def test_non_finite_losses_rank_worst():
    dim = 10
    direction = jnp.ones(dim) / np.sqrt(dim)

    def loss(params):
        # Flat everywhere except a NaN region along +direction.
        return jnp.where(params["w"] @ direction > 0.0, jnp.nan, 0.0)

    params = {"w": jnp.zeros(dim)}
    estimate, member_losses = _estimate(loss, params, jax.random.key(3), population=256,
                                        sigma=0.1)  # fmt: skip
    assert np.isnan(np.asarray(member_losses)).any()
    assert np.all(np.isfinite(np.asarray(estimate["w"])))
    # The estimate points uphill, toward the NaN region, so a descent step moves away.
    assert _cosine(estimate["w"], direction) > 0.5


# --- The estimate against the gradient -----------------------------------------------------


@pytest.mark.parametrize("shaping", ["centred_rank", "none"])
def test_estimate_approaches_gradient(shaping):
    loss, params = _quadratic(100)
    gradient = jax.grad(loss)(params)["w"]

    cosines = []
    populations = (64, 16384) if shaping == "centred_rank" else (16384,)
    for population in populations:
        estimate, _ = _estimate(loss, params, jax.random.key(4), population=population,
                                sigma=0.01, shaping=shaping, chunk_size=1024)  # fmt: skip
        cosines.append(_cosine(estimate["w"], gradient))
    assert cosines == sorted(cosines)
    assert cosines[-1] > 0.99


def test_unshaped_estimate_is_unbiased():
    loss, params = _quadratic(10, seed=5)
    gradient = np.asarray(jax.grad(loss)(params)["w"])
    keys = jax.random.split(jax.random.key(6), 4000)

    def one(key):
        estimate, _ = es_gradient(loss, params, key, population=8, sigma=0.05, shaping="none")
        return estimate["w"]

    samples = np.asarray(jax.jit(jax.vmap(one))(keys))
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0, ddof=1) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - gradient) < 3 * standard_error), (mean, gradient, standard_error)


def test_chunk_size_does_not_change_estimate():
    loss, params = _quadratic(30)
    estimates = [
        _estimate(loss, params, jax.random.key(7), population=20, sigma=0.1, chunk_size=chunk)[0]
        for chunk in (6, 64)
    ]
    for estimate in estimates[1:]:
        np.testing.assert_allclose(estimate["w"], estimates[0]["w"], rtol=1e-5, atol=1e-6)


def test_es_minimises_quadratic_with_adam():
    loss, params = _quadratic(20, seed=8)
    optimizer = optax.adam(0.05)

    @jax.jit
    def step(carry, key):
        params, opt_state = carry
        estimate, _ = es_gradient(loss, params, key, population=32, sigma=0.05)
        updates, opt_state = optimizer.update(estimate, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    keys = jax.random.split(jax.random.key(9), 300)
    (trained, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    minimum = loss(loss.minimiser)
    assert float(loss(trained) - minimum) < 0.02 * float(loss(params) - minimum)


# --- The update rule ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def network():
    """A one-hidden-layer MLP: ES sees any network as one function, and this one compiles
    fast. The shared rule suite runs ES on the CNN."""
    return models.mlp((8, 8, 1), [16])


@pytest.fixture(scope="module")
def batch():
    x = jax.random.uniform(jax.random.key(10), (16, 8, 8, 1))
    return x, jnp.arange(16) % 10


def test_rule_update_outputs(network, batch):
    params = network.init(jax.random.key(0))
    rule = rules.get("es", network, population=8, chunk_size=4)
    state = rule.init(jax.random.key(1), params)

    grads, new_state, metrics = jax.jit(rule.update)(state, params, batch, jax.random.key(2))

    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.shape == p.shape
        assert g.dtype == p.dtype
    expected_loss = losses.softmax_cross_entropy(network.apply(params, batch[0]), batch[1])
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["sigma"], 0.02)
    assert int(new_state.step) == 1


def test_rule_weight_decay_adds_l2_term(network, batch):
    params = network.init(jax.random.key(0))
    settings = dict(population=8, chunk_size=8)
    plain = rules.get("es", network, **settings)
    decayed = rules.get("es", network, weight_decay=0.3, **settings)
    state = plain.init(jax.random.key(1), params)

    g_plain, _, _ = jax.jit(plain.update)(state, params, batch, jax.random.key(3))
    g_decayed, _, _ = jax.jit(decayed.update)(state, params, batch, jax.random.key(3))
    for a, b, p in zip(*map(jax.tree.leaves, (g_decayed, g_plain, params))):
        np.testing.assert_allclose(a - b, 0.3 * p, rtol=1e-4, atol=1e-6)


def test_rule_sigma_schedule(network, batch):
    params = network.init(jax.random.key(0))
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    rule = rules.get("es", network, population=4, chunk_size=4, sigma_schedule=schedule)
    state = rule.init(jax.random.key(1), params)
    update = jax.jit(rule.update)

    sigmas = []
    for step in range(3):
        _, state, metrics = update(state, params, batch, jax.random.key(step))
        sigmas.append(float(metrics["sigma"]))
    np.testing.assert_allclose(sigmas, [0.1, 0.05, 0.025], rtol=1e-6)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"population": 7}, "population must be an even integer"),
        ({"population": 0}, "population must be a positive integer"),
        ({"sigma": 0.0}, "sigma must be a positive number"),
        ({"sigma": float("inf")}, "sigma must be a finite positive number, got inf"),
        ({"sigma": 1e300}, "sigma must be at most 3.4028235e\\+38, float32's largest value"),
        ({"population": 2**40}, "population must be at most 2147483647, int32's largest value"),
        ({"sigma_schedule": lambda step: 0.0}, "sigma_schedule\\(0\\) must be finite and positive"),
        ({"sigma_schedule": lambda step: float("inf")}, "sigma_schedule\\(0\\) must be finite"),
        ({"sigma_schedule": 0.1}, "sigma_schedule must be a function"),
        ({"shaping": "fitness"}, "shaping must be one of"),
        ({"chunk_size": 3}, "chunk_size must be an even integer"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite non-negative number"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite non-negative number"),
        ({"devices": []}, "devices must name at least one device"),
        ({"devices": "cpu"}, "devices must be a sequence of jax.Device objects"),
        ({"devices": [1, 2]}, "devices must be a sequence of jax.Device objects"),
    ],
)
def test_rule_rejects_bad_arguments(network, settings, message):
    with pytest.raises(ValueError, match=message):
        rules.get("es", network, **settings)


# --- Several devices --------------------------------------------------------------------------

SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from bpalt import models, rules, train
    from bpalt.rules.evolution_strategies import es_gradient, population_mesh
    from tests.test_evolution_strategies import _train_one_step

    assert jax.device_count() == 4, jax.devices()
    result = {}

    def loss(params):
        w = params["w"]
        return jnp.sum(jnp.arange(1.0, 51.0) * (w - 1.0) ** 2) + jnp.sum(jnp.sin(3.0 * w))

    params = {"w": jax.random.normal(jax.random.key(0), (50,))}
    mesh = population_mesh()
    # 70 members: 35 pairs, which do not split evenly over 4 devices.
    for population in (70,):
        settings = dict(population=population, sigma=0.1, chunk_size=8)
        single, single_losses = jax.jit(
            lambda k: es_gradient(loss, params, k, **settings))(jax.random.key(1))
        sharded, sharded_losses = jax.jit(
            lambda k: es_gradient(loss, params, k, mesh=mesh, **settings))(jax.random.key(1))
        result[f"estimate_{population}"] = [np.asarray(single["w"]).tolist(),
                                            np.asarray(sharded["w"]).tolist()]
        result[f"losses_{population}"] = [np.asarray(single_losses).tolist(),
                                          np.asarray(sharded_losses).tolist()]

    # The rule on all four devices inside the vmapped, jitted training step over two seeds.
    result["params"] = _train_one_step(rules, train).tolist()
    print(json.dumps(result))
    """
)


def _train_one_step(rules, train):
    """Params (flat) after one ES training step over seeds 0 and 1 on an MLP."""
    network = models.mlp((8, 8, 1), [16])
    x = jax.random.uniform(jax.random.key(2), (32, 8, 8, 1))
    y = jnp.arange(32) % 10
    indices = jnp.stack([jnp.arange(16), jnp.arange(16, 32)])
    rule = rules.get("es", network, population=16, chunk_size=4)
    optimizer = optax.sgd(0.1)
    state = train.init_seeds(rule, network, optimizer, [0, 1])
    state, _ = train.make_seeds_step(rule, optimizer)(state, x, y, indices)
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(state.params)])


def test_sharded_estimate_equals_single_device():
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    environment["JAX_PLATFORMS"] = "cpu"
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), environment.get("PYTHONPATH", "")]
    )
    completed = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    for population in (70,):
        single, sharded = result[f"estimate_{population}"]
        np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
        single_losses, sharded_losses = result[f"losses_{population}"]
        assert len(sharded_losses) == population
        np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-6)
    # This process has one device, so the same step here is the single-device reference.
    assert len(jax.devices()) == 1
    single_device = _train_one_step(rules, train)
    np.testing.assert_allclose(result["params"], single_device, rtol=1e-5, atol=1e-6)
