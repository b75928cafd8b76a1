"""The jitted training step, the epoch loop, evaluation and several seeds in one compiled step.

The epoch loop calls one jitted step per batch from Python. On XLA:CPU a rolled ``lax.scan``
over convolution steps runs the weight-gradient convolution on a slow path (several times
slower per step), and unrolling it costs minutes of compilation, so per-step calls with
asynchronous dispatch are the fast option; the host never waits on a step except to report
progress at the end of an epoch.

Seeds of one rule share one compiled step over a leading seed axis of every state leaf
(batched by ``vmap`` or looped by ``lax.map``, see ``make_seeds_step``). A seed
whose loss becomes non-finite is frozen at its last finite state and flagged as diverged,
so it cannot take the other seeds down.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bpalt.rules.base import UpdateRule


class TrainState(NamedTuple):
    """Everything one run needs to continue training.

    Attributes:
        params: the network's parameter pytree.
        rule_state: the update rule's state.
        opt_state: the optax optimizer's state.
        key: the run's PRNG key; step keys are folded in from it, never split off, so the
            state need not change when the key is used.
        diverged: bool scalar, set once the loss became non-finite; the state then stays at
            its last finite value.
        diverged_step: int32 scalar, the step count at which it diverged (-1 if not).
        step: int32 scalar, the number of steps taken.
    """

    params: Any
    rule_state: Any
    opt_state: Any
    key: jax.Array
    diverged: jax.Array
    diverged_step: jax.Array
    step: jax.Array


def make_train_step(rule: UpdateRule, optimizer: optax.GradientTransformation, *, jit=True):
    """Return ``step(params, rule_state, opt_state, batch, key) -> (params, rule_state,
    opt_state, metrics)``, one jitted function that applies ``rule`` through ``optimizer``.
    """

    def step(params, rule_state, opt_state, batch, key):
        grads, rule_state, metrics = rule.update(rule_state, params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, rule_state, opt_state, metrics

    return jax.jit(step) if jit else step


def init_train_state(rule: UpdateRule, network, optimizer, key: jax.Array) -> TrainState:
    """Initialise params, the rule state and the optimizer state of one run from ``key``."""
    params_key, rule_key, run_key = jax.random.split(key, 3)
    params = network.init(params_key)
    rule_state = rule.init(rule_key, params)
    return TrainState(
        params=params,
        rule_state=rule_state,
        opt_state=optimizer.init(params),
        key=run_key,
        diverged=jnp.array(False),
        diverged_step=jnp.array(-1, jnp.int32),
        step=jnp.array(0, jnp.int32),
    )


def init_seeds(rule, network, optimizer, seeds) -> TrainState:
    """Initialise one run per seed, stacked on a leading seed axis."""
    keys = jnp.stack([jax.random.key(int(seed)) for seed in seeds])
    return jax.jit(jax.vmap(lambda key: init_train_state(rule, network, optimizer, key)))(keys)


def _select(predicate, on_true, on_false):
    """``jnp.where`` for any leaf, PRNG key arrays included."""
    if jnp.issubdtype(on_true.dtype, jax.dtypes.prng_key):
        data = jnp.where(
            predicate, jax.random.key_data(on_true), jax.random.key_data(on_false)
        )
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(on_true))
    return jnp.where(predicate, on_true, on_false)


def _guarded_step(step_fn: Callable, state: TrainState, batch) -> tuple[TrainState, dict]:
    """Take one step of one run, keeping the old state once the loss is non-finite."""
    step_key = jax.random.fold_in(state.key, state.step)
    params, rule_state, opt_state, metrics = step_fn(
        state.params, state.rule_state, state.opt_state, batch, step_key
    )
    candidate = (params, rule_state, opt_state)
    previous = (state.params, state.rule_state, state.opt_state)

    finite = jnp.isfinite(metrics["loss"]) & jnp.all(
        jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(params)])
    )
    newly_diverged = ~finite & ~state.diverged
    diverged = state.diverged | ~finite
    params, rule_state, opt_state = jax.tree.map(
        lambda new, old: _select(diverged, old, new), candidate, previous
    )
    new_state = TrainState(
        params=params,
        rule_state=rule_state,
        opt_state=opt_state,
        key=state.key,
        diverged=diverged,
        diverged_step=jnp.where(newly_diverged, state.step, state.diverged_step),
        step=state.step + 1,
    )
    return new_state, metrics


SEED_LOOPS = ("auto", "vmap", "map")

MAP_THRESHOLD_BYTES = 48 * 2**20
"""``seed_loop="auto"`` runs seeds one after another once the arrays that one seed's step
creates add up to more than this (``intermediate_bytes``), a measure of the step's memory
traffic. It was chosen on a 2-core CPU, from three seeds under ``vmap`` against
``lax.map``:

- ``vmap`` faster: backprop on the digits CNN at batch 64 (24 MiB), 2.0 against 2.7 ms;
  NTK linearisation there (31 MiB), 2.9 against 3.5 ms; feedback alignment (43 MiB), 1.9
  against 2.7 ms.
- About even: ES on the digits CNN at batch 32 (52 MiB), 73 against 74 ms.
- ``lax.map`` faster: random features on ``patch_cnn`` at batch 64 (53 MiB), 1.4 against
  1.5 ms; Greedy InfoMax on ``patch_cnn`` at batch 32 (64 MiB), 26 against 39 ms; ES on
  the digits CNN at batch 64 (108 MiB), 237 against 264 ms; LeNet at batch 128 (260 MiB),
  17 against 34 ms.

Since LeNet's convolutions run fused with their pools, the arrays its steps create sum to
less, and no single threshold fits every rule on it. In two benchmark runs
(``experiments/results/benchmarks.md`` and the run before it), three seeds at batch 128
took 11.9 and 11.5 ms under ``vmap`` against 12.8 and 13.7 ms under ``lax.map`` for
backprop (110 MiB), 14.3 and 12.4 against 15.7 and 15.0 ms for feedback alignment (198 MiB)
and 5.1 and 5.1 against 5.4 and 5.7 ms for random features (79 MiB). For DFA (100 MiB) they
took 18.7 and 14.7 against 10.1 and 10.6 ms, and for NTK linearisation (141 MiB) 19.7 and
19.3 against 18.7 and 18.3 ms. HSIC (141 MiB) took 16.1 against 17.7 ms in one run and 26.4
against 19.8 ms in the other. The rule keeps ``lax.map`` for all six, and
``seed_loop="vmap"`` batches the first three."""


def intermediate_bytes(fn: Callable, *args) -> int:
    """Return the summed size in bytes of the arrays that tracing ``fn(*args)`` creates.

    ``args`` may be ``jax.ShapeDtypeStruct``s. Arrays inside nested jaxprs (jit, custom
    derivatives, loops) count too, each once per appearance in the trace.
    """
    return sum(_array_bytes(jax.make_jaxpr(fn)(*args).jaxpr))


def largest_array_bytes(fn: Callable, *args) -> int:
    """Return the size in bytes of the largest array that tracing ``fn(*args)`` creates.

    Nothing is computed or allocated; ``args`` may be ``jax.ShapeDtypeStruct``s.
    """
    return max(_array_bytes(jax.make_jaxpr(fn)(*args).jaxpr), default=0)


def _array_bytes(jaxpr):
    """Yield the size in bytes of every array that ``jaxpr`` and its nested jaxprs create."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                yield math.prod(aval.shape) * getattr(aval.dtype, "itemsize", 4)
        for value in eqn.params.values():
            for sub in _jaxprs_in(value):
                yield from _array_bytes(sub)


def _jaxprs_in(value):
    """Return the jaxprs that one equation parameter contains."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [jaxpr for item in value for jaxpr in _jaxprs_in(item)]
    return []


def make_seeds_step(
    rule: UpdateRule, optimizer: optax.GradientTransformation, seed_loop: str = "auto"
):
    """Return a jitted ``(state, x, y, indices) -> (state, metrics)`` over stacked seeds.

    ``state`` has a leading seed axis; ``x`` (n, ...) and ``y`` (n,) are the whole training
    set on the device, shared by all seeds; ``indices`` (seeds, batch) picks each seed's
    batch, gathered inside the jitted function.

    ``seed_loop`` sets how the seeds run inside the one compiled call: ``"vmap"`` batches
    them into one step, ``"map"`` runs them one after another (``lax.map``), and ``"auto"``
    (the default) takes ``"map"`` for a single seed or when the arrays one seed's step creates
    add up to more than ``MAP_THRESHOLD_BYTES``, and ``"vmap"`` otherwise. All three compute
    the same function, but XLA may order the float sums differently, so a run whose loop
    changes can end apart (Greedy InfoMax on reduced MNIST: 97.13 % under ``vmap``, 97.03 %
    under ``lax.map``, over 3 seeds). Adam can turn such rounding in an almost-zero gradient
    into a whole step: HSIC on the digits reached 92.36 % under ``vmap`` and 94.72 % under
    ``lax.map`` after 8 epochs (2 seeds). Batching seeds pays off while a step's arrays fit
    in the caches; beyond that it multiplies the memory traffic.
    """
    if seed_loop not in SEED_LOOPS:
        raise ValueError(
            f"invalid seed_loop {seed_loop!r}; expected one of {', '.join(SEED_LOOPS)}"
        )
    one_seed = _one_seed_step(rule, optimizer)

    def by_vmap(state, x, y, indices):
        return jax.vmap(one_seed, in_axes=(0, None, None, 0))(state, x, y, indices)

    def by_map(state, x, y, indices):
        return lax.map(lambda pair: one_seed(pair[0], x, y, pair[1]), (state, indices))

    def seeds_step(state, x, y, indices):
        loop = seed_loop
        if loop == "auto":
            loop = choose_seed_loop(one_seed, state, x, y, indices)
        return (by_map if loop == "map" else by_vmap)(state, x, y, indices)

    return jax.jit(seeds_step, donate_argnums=0)


def _one_seed_step(rule: UpdateRule, optimizer: optax.GradientTransformation) -> Callable:
    """Build the unjitted ``(state, x, y, indices) -> (state, metrics)`` of one seed."""
    step_fn = make_train_step(rule, optimizer, jit=False)

    def one_seed(state, x, y, indices):
        return _guarded_step(step_fn, state, (x[indices], y[indices]))

    return one_seed


def seed_loop_for(
    rule: UpdateRule, optimizer, state: TrainState, x, y, indices, seed_loop: str = "auto"
) -> str:
    """Return the loop, ``"map"`` or ``"vmap"``, that ``make_seeds_step(rule, optimizer,
    seed_loop)`` runs on these arguments, resolving ``"auto"`` from their shapes."""
    if seed_loop != "auto":
        return seed_loop
    return choose_seed_loop(_one_seed_step(rule, optimizer), state, x, y, indices)


def choose_seed_loop(one_seed: Callable, state, x, y, indices) -> str:
    """Choose ``"map"`` or ``"vmap"`` for ``seed_loop="auto"`` from shapes alone (see
    ``make_seeds_step``)."""
    if indices.shape[0] == 1:
        return "map"
    unbatched = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), state)
    row = jax.ShapeDtypeStruct(indices.shape[1:], indices.dtype)
    created = intermediate_bytes(one_seed, unbatched, x, y, row)
    return "map" if created > MAP_THRESHOLD_BYTES else "vmap"


def epoch_permutations(state: TrainState, epoch: int, num_examples: int, batch_size: int):
    """Return each seed's shuffled batch indices for ``epoch``: (steps, seeds, batch).

    The order depends only on the run key and the epoch, so a resumed run gets the same
    batches. The last partial batch is dropped to keep one compiled shape.
    """
    steps = num_examples // batch_size

    def one_seed(key):
        shuffle_key = jax.random.fold_in(jax.random.fold_in(key, 0x5EED), epoch)
        order = jax.random.permutation(shuffle_key, num_examples)
        return order[: steps * batch_size].reshape(steps, batch_size)

    return jnp.swapaxes(jax.vmap(one_seed)(state.key), 0, 1)


def run_epoch(
    seeds_step, state: TrainState, x, y, epoch: int, batch_size: int, on_step=None
):
    """Train every seed for one epoch; return the state and the metrics' mean per seed.

    ``on_step(index, state)``, if given, is called after each step with the step's index
    within the epoch (from 0) and the new state.
    """
    integer = isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool)
    if not integer or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if batch_size > x.shape[0]:
        raise ValueError(
            f"batch size {batch_size} is larger than the training set ({x.shape[0]} examples); "
            "choose a smaller --batch-size"
        )
    permutations = epoch_permutations(state, epoch, x.shape[0], batch_size)
    history = []
    for index, indices in enumerate(permutations):
        state, metrics = seeds_step(state, x, y, indices)
        history.append(metrics)
        if on_step is not None:
            on_step(index, state)
    means = jax.tree.map(lambda *values: jnp.stack(values).mean(axis=0), *history)
    return state, means


EVALUATION_CHUNK = 1024
"""Examples that ``make_evaluate`` passes through the network at once, for every seed."""


def make_evaluate(rule: UpdateRule, loss, chunk_size: int = EVALUATION_CHUNK):
    """Return a jitted ``(state, x, y) -> (accuracy, loss)``, each of shape (seeds,)."""

    def one_seed(state, x, y):
        logits = rule.predict(state.rule_state, state.params, x)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
        return correct, loss(logits, y) * x.shape[0]

    evaluate_chunk = jax.jit(jax.vmap(one_seed, in_axes=(0, None, None)))

    def evaluate(state, x, y):
        correct, total_loss = 0.0, 0.0
        for start in range(0, x.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            chunk_correct, chunk_loss = evaluate_chunk(state, x[chunk], y[chunk])
            correct, total_loss = correct + chunk_correct, total_loss + chunk_loss
        n = x.shape[0]
        return np.asarray(correct) / n, np.asarray(total_loss) / n

    return evaluate


def select_seeds(state: TrainState, mask) -> TrainState:
    """Keep the seeds where ``mask`` (seeds,) is true."""
    mask = np.asarray(mask)
    return jax.tree.map(lambda leaf: leaf[mask], state)
