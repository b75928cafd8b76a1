"""Step-time benchmark of every registered rule against hand-written JAX and peer libraries.

``python -m bpalt.bench`` (or ``run(Settings(...))``) measures, on the workloads of
``bpalt.workloads``:

- for every registered rule: milliseconds per training step, as the median and
  interquartile range of the timed steps after warm-up and compilation. Also the ratio to a
  hand-written jitted ``jax.grad`` + optax step on the same network, the compile time and
  XLA's buffer memory;
- peers in the same process when installed: plain JAX (``lax.conv_general_dilated`` and
  ``lax.reduce_window``), PyTorch eager backprop, BioTorch's FA and DFA, and evosax's
  Open_ES generation at the ES rule's population; each is skipped with a stated reason
  otherwise;
- the machine's jitted float32 matmul rate and each backprop step's FLOP rate against it;
- 3 seeds in one compiled step (``train.make_seeds_step``, with the seed loop it chooses and
  with the other one) against one seed, and an epoch of the training loop against
  steps x step time;
- rules that train at batch 256 (HSIC, Greedy InfoMax) against backprop at that batch, and
  the empirical NTK of the W1 network.

Every step function of one workload is timed in the same process, in rounds that take
turns (round-robin), so that a change of machine load hits all of them alike and the ratios
stay meaningful on a busy machine. The load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import threadpoolctl
from jax import lax

from bpalt import checkpoint, losses, nn, reporting, rules, train, workloads
from bpalt.argtypes import INTERRUPTED, USAGE_ERROR, OneLineParser, exit_process, usage_line
from bpalt.workloads import Workload

NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"
PACKAGES = ("jax", "jaxlib", "optax", "numpy", "torch", "biotorch", "evosax")
LEARNING_RATE = 1e-3
BACKPROP_STEPS = ("jax.grad + optax", "bp", "plain JAX (lax.conv)", "PyTorch eager")
"""Rows (or row prefixes) that compute the exact loss gradient; their FLOP rate is reported."""
OPTIONAL_PEERS = "PyTorch, BioTorch and evosax"
"""The peers that ``--no-peers`` leaves out, as the report names them. The plain JAX model
needs no extra package, so it always runs."""
NO_PEERS = "peers"
"""Key of the ``--no-peers`` entry among a workload's skipped rows in the JSON output."""
TORCH_PEERS = ("PyTorch eager", "BioTorch fa", "BioTorch dfa")
LOCAL_RULES = ("hsic", "gim")
"""Rules also measured at ``Settings.local_batch``, their usual batch size."""
LOCAL_WORKLOAD = "W1"
"""Workload on which the local rules at ``local_batch`` and the empirical NTK are timed."""
LOCAL_VARIANTS = {"hsic (plain estimator)": ("hsic", {"estimator": "plain"})}
"""Extra rows of the batch-256 measurement: row name -> (rule, hyperparameters). HSIC's
plain estimator is the one in the paper's equations. The registered default, the normalised
estimator, is the one the authors' code trains with."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure and how long.

    Attributes:
        workloads: names from ``bpalt.workloads.WORKLOADS``.
        rules: rule names; ``None`` measures every registered rule.
        steps: timed steps per step function (at least 30 for the committed figures).
        rounds: the timed steps are split into this many rounds, taking turns with the
            other step functions of the same workload.
        warmup: untimed steps after compilation, and one more at the start of each round.
        batch_size: overrides every workload's batch size (tests use a tiny one). ``run``
            raises ``ValueError`` when it is larger than a workload's training set.
        data_dir: directory with MNIST's t10k IDX files for W2; random data without it.
        peers: measure PyTorch, BioTorch and evosax when installed.
        seeds: seeds of the ``vmap`` measurement, against one seed.
        seed_rules: rules of the seeds measurement; ``None`` measures all, ``()`` none.
        epoch_rules: rules of the training-loop measurement (the loop does not depend on
            the rule; ``bp`` by default, ``()`` measures none).
        seeds_budget_s: seconds the seeds measurement of one rule may take. A rule with
            slow steps (ES on W2) therefore gets fewer than ``steps`` timed steps, at least 5.
        es_population: population of the ES rule and of evosax's Open_ES.
        local_batch: batch size of the ``LOCAL_RULES`` measurement (0 skips it).
        ntk_examples: inputs of the empirical NTK (0 skips it).
        matmul_size: side of the float32 matmul that gives the machine's FLOP rate.
        epochs: timed epochs of the training-loop measurement (0 skips it).
        epoch_steps: caps the steps of those epochs (None: the whole training set).
    """

    workloads: tuple[str, ...] = ("W1", "W2")
    rules: tuple[str, ...] | None = None
    steps: int = 30
    rounds: int = 10
    warmup: int = 3
    batch_size: int | None = None
    data_dir: str | None = None
    peers: bool = True
    seeds: int = 3
    seed_rules: tuple[str, ...] | None = None
    epoch_rules: tuple[str, ...] = ("bp",)
    seeds_budget_s: float = 30.0
    es_population: int = 256
    local_batch: int = 256
    ntk_examples: int = 64
    matmul_size: int = 2048
    epochs: int = 2
    epoch_steps: int | None = None


# --- Timing ---------------------------------------------------------------------------------


class Stepper:
    """A step function with its state: ``step()`` runs one step and waits for it.

    Attributes:
        name: the row name.
        step: ``() -> None``; runs one step, updates the state, returns when it is done.
        compile_s: seconds to trace, lower and compile (None where not measured).
        memory_bytes: XLA's buffer memory of the step: arguments + outputs + temporaries
            (None where not measured).
        flops: FLOPs of one step (None where not counted).
    """

    def __init__(self, name, step, compile_s=None, memory_bytes=None, flops=None):
        self.name = name
        self.step = step
        self.compile_s = compile_s
        self.memory_bytes = memory_bytes
        self.flops = flops


def summarize_times(seconds: Sequence[float]) -> dict[str, float]:
    """Return the median, quartiles, minimum and maximum of step times, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p25_ms": float(np.percentile(ms, 25)),
        "p75_ms": float(np.percentile(ms, 75)),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "steps": int(ms.size),
    }


def time_round_robin(
    steppers: Sequence[Stepper], steps: int, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Time ``steps`` steps of every stepper, in ``rounds`` turns each.

    Each stepper first runs ``warmup`` untimed steps. In every round each stepper runs one
    untimed step (so a switch of function does not charge the next one for cold caches),
    then its share of the timed steps, each waited for. The order rotates from round to
    round, so that no stepper always follows the same neighbour.

    Returns:
        ``{name: [[seconds per timed step] per round]}``.
    """
    for stepper in steppers:
        for _ in range(warmup):
            stepper.step()

    rounds = max(1, min(rounds, steps))
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    samples: dict[str, list[list[float]]] = {s.name: [] for s in steppers}
    for round_index, count in enumerate(per_round):
        shift = round_index % len(steppers)
        for stepper in [*steppers[shift:], *steppers[:shift]]:
            stepper.step()
            times = []
            for _ in range(count):
                start = time.perf_counter()
                stepper.step()
                times.append(time.perf_counter() - start)
            samples[stepper.name].append(times)
    return samples


def flatten(rounds: Sequence[Sequence[float]]) -> list[float]:
    """Join the per-round samples of ``time_round_robin`` into one list."""
    return [value for times in rounds for value in times]


def round_medians_ms(rounds: Sequence[Sequence[float]]) -> list[float]:
    """Return the median of each round's samples, in milliseconds."""
    return [float(np.median(times)) * 1e3 for times in rounds]


def paired_ratio(rounds_ms: Sequence[float], reference_ms: Sequence[float]) -> float:
    """Return the median over rounds of the per-round ratio of two rows' medians.

    Both rows ran in the same rounds, so each per-round ratio compares them under the same
    load. On a busy machine this varies less than the ratio of overall medians.
    """
    return float(np.median(np.asarray(rounds_ms) / np.asarray(reference_ms)))


def compile_jax(fn: Callable, *args) -> tuple[Callable, float, int | None]:
    """Trace, lower and compile ``fn`` for ``args``.

    Returns:
        ``(compiled, seconds, memory_bytes)``; the memory is XLA's arguments + outputs +
        temporaries - aliased bytes, or None where the backend does not report it.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        stats = compiled.memory_analysis()
        memory = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
    except (AttributeError, NotImplementedError, RuntimeError):
        memory = None
    return compiled, seconds, memory


def train_stepper(name: str, step_fn: Callable, carry: tuple, batch, key, flops=None) -> Stepper:
    """Compile ``step_fn(*carry, batch, key) -> (*carry, metrics)`` into a ``Stepper``."""
    compiled, seconds, memory = compile_jax(step_fn, *carry, batch, key)
    state = {"carry": carry}

    def step():
        outputs = compiled(*state["carry"], batch, key)
        state["carry"] = outputs[:-1]
        jax.block_until_ready(outputs)

    return Stepper(name, step, seconds, memory, flops)


# --- The hand-written reference and the rules -------------------------------------------


def reference_train_step(network: nn.Network, optimizer: optax.GradientTransformation):
    """Build the hand-written jitted ``jax.grad`` + optax step on ``network``.

    Same signature as ``train.make_train_step``:
    ``(params, unused_state, opt_state, batch, key) -> (params, unused_state, opt_state,
    metrics)``.
    """

    def loss_fn(params, x, y):
        return losses.softmax_cross_entropy(network.apply(params, x), y)

    def step(params, unused_state, opt_state, batch, key):
        del key
        x, y = batch
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), unused_state, opt_state, {"loss": loss}

    return jax.jit(step)


def layer_shapes(layers: Sequence[tuple], input_shape: Sequence[int]):
    """Yield ``(layer, input shape, output shape)`` for each entry of a workload's layer
    list (see ``bpalt.workloads.Workload.layers``). Shapes exclude the batch axis."""
    shape = tuple(input_shape)
    for layer in layers:
        if layer[0] == "conv":
            _, features, kernel, padding = layer
            size = [nn.conv_output_size(n, kernel, 1, padding) for n in shape[:2]]
            output = (*size, features)
        elif layer[0] == "pool":
            output = (shape[0] // layer[1], shape[1] // layer[1], shape[2])
        elif layer[0] == "flatten":
            output = (math.prod(shape),)
        elif layer[0] == "dense":
            output = (layer[1],)
        else:
            output = shape
        yield layer, shape, output
        shape = output


def backprop_flops(workload: Workload, input_shape, batch_size: int) -> float:
    """Count a backprop step's FLOPs on ``workload``: 3 x the forward pass (forward, input
    and weight gradients).

    The forward pass counts 2 FLOPs per multiply-add of each convolution (``2 kh kw in out``
    per output position, padding included) and each dense layer (``2 in out``). This is the
    usual nominal count, which leaves out activations, pools and biases. It is a closed form of the
    network, not of bpalt's implementation, whose convolutions fused with their pools do
    1.44 times these multiply-adds (5 x 5 kernels on a 2 x 2 pool's grid).
    """
    forward = 0
    for layer, shape_in, shape_out in layer_shapes(workload.layers, input_shape):
        if layer[0] == "conv":
            forward += 2 * layer[2] ** 2 * shape_in[-1] * math.prod(shape_out)
        elif layer[0] == "dense":
            forward += 2 * shape_in[0] * shape_out[0]
    return 3.0 * forward * batch_size


def rule_kwargs(name: str, settings: Settings) -> dict[str, Any]:
    """Return the hyperparameters the benchmark sets: the population, where a rule has one."""
    if "population" in rules.hyperparameters(name):
        return {"population": settings.es_population}
    return {}


def rule_stepper(
    name: str, network: nn.Network, params, batch, settings: Settings, label=None, **extra
):
    """Compile ``train.make_train_step`` of registered rule ``name`` at ``params``.

    ``extra`` hyperparameters go to the rule; ``label`` names the row (default ``name``).
    """
    rule = rules.get(name, network, **rule_kwargs(name, settings), **extra)
    optimizer = optax.adam(LEARNING_RATE)
    rule_key, step_key = jax.random.split(jax.random.key(1))
    carry = (params, rule.init(rule_key, params), optimizer.init(params))
    step_fn = train.make_train_step(rule, optimizer)
    return train_stepper(label or name, step_fn, carry, batch, step_key)


def reference_stepper(
    network: nn.Network, params, batch, flops=None, label="jax.grad + optax"
) -> Stepper:
    """Compile the hand-written reference step, whose FLOP count is ``flops`` if known."""
    optimizer = optax.adam(LEARNING_RATE)
    carry = (params, (), optimizer.init(params))
    step_fn = reference_train_step(network, optimizer)
    return train_stepper(label, step_fn, carry, batch, jax.random.key(1), flops)


# --- Plain JAX, the model a researcher writes without bpalt ----------------------------------


def he_normal(rng: np.random.Generator, shape: Sequence[int]) -> jax.Array:
    """Draw He-normal float32 weights with NumPy: std sqrt(2 / fan_in), where fan_in is the
    product of all but the last axis. NumPy avoids compiling ``jax.random`` per shape."""
    scale = math.sqrt(2.0 / math.prod(shape[:-1]))
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def draw_params(network: nn.Network, seed: int = 0):
    """Draw params of ``network``'s structure: He-normal weights and zero biases."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(network.init, jax.random.key(0))
    return jax.tree.map(
        lambda leaf: he_normal(rng, leaf.shape) if len(leaf.shape) > 1
        else jnp.zeros(leaf.shape, leaf.dtype),
        shapes,
    )


def plain_jax_model(layers: Sequence[tuple], input_shape: Sequence[int]):
    """Build ``(init(seed) -> params, apply(params, x) -> logits)`` from ``lax`` primitives.

    Convolutions use ``lax.conv_general_dilated`` (NHWC, HWIO) and max-pooling uses
    ``lax.reduce_window``: the model a researcher writes in plain JAX, without bpalt.
    ``layers`` is a workload's layer list (see ``bpalt.workloads.Workload.layers``).
    """
    shapes = []
    for layer, shape_in, _ in layer_shapes(layers, input_shape):
        if layer[0] == "conv":
            shapes.append((layer[2], layer[2], shape_in[-1], layer[1]))
        elif layer[0] == "dense":
            shapes.append((shape_in[0], layer[1]))

    def init(seed):
        rng = np.random.default_rng(seed)
        return [(he_normal(rng, shape), jnp.zeros(shape[-1], jnp.float32)) for shape in shapes]

    def apply(params, x):
        index = 0
        for layer in layers:
            if layer[0] in ("conv", "dense"):
                w, b = params[index]
                index += 1
                if layer[0] == "conv":
                    x = lax.conv_general_dilated(
                        x, w, (1, 1), layer[3], dimension_numbers=("NHWC", "HWIO", "NHWC")
                    )
                else:
                    x = x @ w
                x = x + b.reshape((1,) * (x.ndim - 1) + (-1,))
            elif layer[0] == "relu":
                x = jax.nn.relu(x)
            elif layer[0] == "pool":
                window = (1, layer[1], layer[1], 1)
                x = lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")
            elif layer[0] == "flatten":
                x = x.reshape(x.shape[0], -1)
        return x

    return init, apply


def plain_jax_stepper(workload: Workload, input_shape, batch) -> Stepper:
    """Compile backprop on ``plain_jax_model``: ``jit(value_and_grad)`` + optax Adam."""
    init, apply = plain_jax_model(workload.layers, input_shape)
    optimizer = optax.adam(LEARNING_RATE)

    def loss_fn(params, x, y):
        return losses.softmax_cross_entropy(apply(params, x), y)

    def step(params, unused_state, opt_state, batch, key):
        del key
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), unused_state, opt_state, {"loss": loss}

    params = init(0)
    carry = (params, (), optimizer.init(params))
    return train_stepper("plain JAX (lax.conv)", jax.jit(step), carry, batch, jax.random.key(1))


# --- Peers: PyTorch, BioTorch, evosax -------------------------------------------------------


def _import(name: str):
    """Import ``name``: ``(module, None)``, or ``(None, reason)`` when it is missing."""
    try:
        return importlib.import_module(name), None
    except ImportError as error:
        return None, f"{name} is not installed ({error}); install the `bench` extra"


def torch_model(torch, layers: Sequence[tuple], input_shape: Sequence[int]):
    """Build the workload's layers as a ``torch.nn.Sequential`` (NCHW, as PyTorch expects)."""
    modules, channels, shape = [], input_shape[-1], tuple(input_shape)
    for layer in layers:
        if layer[0] == "conv":
            _, features, kernel, padding = layer
            pad = kernel // 2 if padding == "SAME" else 0
            modules.append(torch.nn.Conv2d(channels, features, kernel, padding=pad))
            size = [nn.conv_output_size(n, kernel, 1, padding) for n in shape[:2]]
            channels, shape = features, (*size, features)
        elif layer[0] == "relu":
            modules.append(torch.nn.ReLU())
        elif layer[0] == "pool":
            modules.append(torch.nn.MaxPool2d(layer[1]))
            shape = (shape[0] // layer[1], shape[1] // layer[1], shape[2])
        elif layer[0] == "flatten":
            modules.append(torch.nn.Flatten())
            channels = math.prod(shape)
        elif layer[0] == "dense":
            modules.append(torch.nn.Linear(channels, layer[1]))
            channels = layer[1]
    return torch.nn.Sequential(*modules)


def torch_stepper(name: str, torch, model, batch, threads: int, dfa=False) -> Stepper:
    """Wrap a PyTorch eager training step (cross-entropy, Adam) of ``model`` on ``batch``.

    Each step runs with ``threads`` intra-op threads. BioTorch's DFA module takes the labels
    and the loss in its forward pass; its layers' FutureWarning about non-full backward
    hooks is silenced.
    """
    x = torch.from_numpy(np.asarray(batch[0]).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(np.asarray(batch[1]).astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            optimizer.zero_grad()
            logits = model(x, y, loss_fn) if dfa else model(x)
            loss_fn(logits, y).backward()
            optimizer.step()

    return Stepper(name, step)


def torch_threads() -> tuple[int, ...]:
    """Return the thread counts PyTorch is timed with: all cores, and one.

    On a busy machine PyTorch's threads wait for each other. One LeNet step took a median
    of 400 ms with 2 threads at load average 4 on 2 cores, and 14 ms at best. The peer is
    therefore also timed with one thread, and compared at its faster setting.
    """
    return tuple(dict.fromkeys((os.cpu_count() or 1, 1)))


def torch_peers(workload: Workload, input_shape, batch) -> tuple[list[Stepper], dict]:
    """Build PyTorch eager backprop and BioTorch FA and DFA, or the reasons to skip them.

    Each is timed with every count of ``torch_threads``; rows are named
    ``"<peer> (<n> threads)"``.
    """
    torch, reason = _import("torch")
    if torch is None:
        return [], {name: reason for name in TORCH_PEERS}
    biomodule, bio_reason = _import("biotorch.module.biomodule")
    steppers, skipped = [], {}
    for name in TORCH_PEERS:
        if name != "PyTorch eager" and biomodule is None:
            skipped[name] = bio_reason
            continue
        mode = name.split()[-1]
        for threads in torch_threads():
            torch.manual_seed(0)
            model = torch_model(torch, workload.layers, input_shape)
            if name != "PyTorch eager":
                with contextlib.redirect_stdout(io.StringIO()):
                    model = biomodule.BioModule(
                        model, mode=mode, output_dim=10 if mode == "dfa" else None
                    )
            label = f"{name} ({threads} thread{'s' if threads > 1 else ''})"
            steppers.append(
                torch_stepper(label, torch, model, batch, threads, dfa=mode == "dfa")
            )
    return steppers, skipped


def evosax_stepper(workload: Workload, input_shape, batch, population: int):
    """Compile one evosax Open_ES generation of the plain JAX model: ask, evaluate, tell.

    The population is evaluated with one ``vmap``. Population size, antithetic sampling,
    centred-rank shaping (evosax's default) and Adam are those of the ES rule.

    Returns:
        ``(stepper, None)`` or ``(None, reason)``.
    """
    evosax, reason = _import("evosax.algorithms")
    if evosax is None:
        return None, reason
    init, apply = plain_jax_model(workload.layers, input_shape)
    params = init(0)
    strategy = evosax.Open_ES(
        population_size=population,
        solution=params,
        optimizer=optax.adam(LEARNING_RATE),
        std_schedule=optax.constant_schedule(0.02),
    )
    es_params = strategy.default_params
    x, y = batch

    def generation(state, key):
        ask_key, tell_key = jax.random.split(key)
        members, state = strategy.ask(ask_key, state, es_params)
        fitness = jax.vmap(lambda p: losses.softmax_cross_entropy(apply(p, x), y))(members)
        state, _ = strategy.tell(tell_key, members, fitness, state, es_params)
        return state

    state = strategy.init(jax.random.key(1), params, es_params)
    key = jax.random.key(2)
    compiled, seconds, memory = compile_jax(generation, state, key)
    holder = {"state": state}

    def step():
        holder["state"] = compiled(holder["state"], key)
        jax.block_until_ready(holder["state"])

    return Stepper(f"evosax Open_ES (population {population})", step, seconds, memory), None


# --- Machine rate -----------------------------------------------------------------------------


MATMUL = "float32 matmul (machine rate)"


def matmul_stepper(size: int) -> Stepper:
    """Compile the float32 ``size x size`` matmul, whose FLOP rate is the machine's."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((size, size)), jnp.float32) for _ in range(2))
    compiled, seconds, memory = compile_jax(jnp.matmul, a, b)

    def step():
        jax.block_until_ready(compiled(a, b))

    return Stepper(MATMUL, step, seconds, memory, 2.0 * size**3)


def matmul_rate(size: int, repeats: int = 30) -> dict[str, float]:
    """Time the matmul of ``matmul_stepper`` on its own: median ms and GFLOP/s."""
    stepper = matmul_stepper(size)
    median = float(np.median(flatten(time_round_robin([stepper], repeats, 1, 1)[MATMUL])))
    return {"size": size, "median_ms": median * 1e3, "gflops": stepper.flops / median / 1e9}


# --- One workload -------------------------------------------------------------------------------


def check_rule_names(names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming every entry of ``names`` that is not a registered rule."""
    registered = rules.names()
    unknown = [name for name in names if name not in registered]
    if unknown:
        listed = ", ".join(repr(name) for name in unknown)
        raise ValueError(f"unknown rule {listed}; accepted: {', '.join(registered)}")


def _rule_names(settings: Settings) -> tuple[str, ...]:
    if settings.rules is None:
        return rules.names()
    check_rule_names(settings.rules)
    return tuple(settings.rules)


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def _row(stepper: Stepper, rounds, kind: str) -> dict[str, Any]:
    """Summarize a stepper's per-round samples as a table row."""
    row = {"name": stepper.name, "kind": kind, **summarize_times(flatten(rounds))}
    row["rounds_ms"] = round_medians_ms(rounds)
    row["compile_s"] = stepper.compile_s
    row["memory_mib"] = None if stepper.memory_bytes is None else stepper.memory_bytes / 2**20
    row["flops"] = stepper.flops
    return row


def step_times(workload: Workload, settings: Settings, batch, log) -> dict[str, Any]:
    """Time every rule, the reference and the peers on one workload, round-robin."""
    network = workload.build()
    params = draw_params(network)
    flops = backprop_flops(workload, network.input_shape, batch[0].shape[0])
    reference = reference_stepper(network, params, batch, flops)
    steppers, kinds, skipped = [reference], {reference.name: "reference"}, {}

    for name in _rule_names(settings):
        log(f"  {workload.name}: compiling rule {name}")
        try:
            stepper = rule_stepper(name, network, params, batch, settings)
        except Exception as error:  # noqa: BLE001 - a broken rule is reported, not fatal
            skipped[name] = _failure(error)
            continue
        steppers.append(stepper)
        kinds[name] = "rule"

    steppers.append(plain_jax_stepper(workload, network.input_shape, batch))
    kinds[steppers[-1].name] = "peer"
    if settings.peers:
        peers, peer_skips = torch_peers(workload, network.input_shape, batch)
        steppers += peers
        kinds.update({p.name: "peer" for p in peers})
        skipped.update(peer_skips)
        if "es" in kinds and workload.name == "W1":
            stepper, reason = evosax_stepper(
                workload, network.input_shape, batch, settings.es_population
            )
            if stepper is None:
                skipped["evosax Open_ES"] = reason
            else:
                steppers.append(stepper)
                kinds[stepper.name] = "peer"
    else:
        skipped[NO_PEERS] = "not measured (--no-peers)"

    for stepper in steppers:
        if stepper.name.startswith(BACKPROP_STEPS):
            stepper.flops = reference.flops
    steppers.append(matmul_stepper(settings.matmul_size))
    kinds[MATMUL] = "machine"
    log(f"  {workload.name}: timing {len(steppers)} step functions")
    samples = time_round_robin(steppers, settings.steps, settings.rounds, settings.warmup)
    rows = [_row(stepper, samples[stepper.name], kinds[stepper.name]) for stepper in steppers]
    for row in rows:
        row["ratio_to_reference"] = _pair(row, rows[0])
    return {"rows": rows, "skipped": skipped}


def _measured_parts(name: str, seed_rules, epoch_rules) -> str:
    """``"seeds"``, ``"epoch"`` or ``"seeds and epoch"``: what is measured of rule ``name``."""
    chosen = (("seeds", name in seed_rules), ("epoch", name in epoch_rules))
    return " and ".join(part for part, measured in chosen if measured)


def seeds_and_epoch(workload: Workload, settings: Settings, x, y, log) -> dict[str, Any]:
    """Time several seeds against one seed, and an epoch against steps x step time."""
    network = workload.build()
    batch_size = settings.batch_size or workload.batch_size
    seed_rules = settings.seed_rules if settings.seed_rules is not None else _rule_names(settings)
    epoch_rules = settings.epoch_rules if settings.epochs > 0 else ()
    results = {"seeds": [], "epochs": [], "skipped": {}}
    for name in dict.fromkeys((*seed_rules, *epoch_rules)):
        log(f"  {workload.name}: {_measured_parts(name, seed_rules, epoch_rules)} of rule {name}")
        try:
            rule = rules.get(name, network, **rule_kwargs(name, settings))
            optimizer = optax.adam(LEARNING_RATE)
            state = train.init_seeds(rule, network, optimizer, range(settings.seeds))
            first = train.select_seeds(state, np.arange(settings.seeds) == 0)
            # The steps donate the state they get, so every run starts from its own copy.
            spare, first_copy = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, first)
            many = SeedsRun(rule, optimizer, state, x, y, batch_size)
            if name in seed_rules:
                one = SeedsRun(rule, optimizer, first, x, y, batch_size)
                other_loop = "map" if many.loop == "vmap" else "vmap"
                other = SeedsRun(rule, optimizer, spare, x, y, batch_size, other_loop)
                wide = SeedsRun(rule, optimizer, first_copy, x, y, batch_size * settings.seeds)
                results["seeds"].append(_seeds_row(name, one, many, other, wide, settings))
            if name in epoch_rules:
                results["epochs"].append(_epoch_row(name, many, settings))
        except Exception as error:  # noqa: BLE001 - a broken rule is reported, not fatal
            results["skipped"][name] = _failure(error)
    return results


class SeedsRun:
    """Several seeds of one rule trained with ``train.make_seeds_step``, as ``compare`` does.

    Attributes:
        seeds_step: the jitted ``(state, x, y, indices) -> (state, metrics)``.
        state: the stacked ``TrainState``, one entry per seed.
        stepper: a ``Stepper`` of one step on a fixed batch; its ``compile_s`` is the first
            call's time.
    """

    def __init__(self, rule, optimizer, state, x, y, batch_size: int, seed_loop: str = "auto"):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seeds_step = train.make_seeds_step(rule, optimizer, seed_loop)
        seeds = jax.tree.leaves(state.step)[0].shape[0]
        indices = jnp.tile(jnp.arange(batch_size) % x.shape[0], (seeds, 1))
        self.loop = train.seed_loop_for(rule, optimizer, state, x, y, indices, seed_loop)
        self.state = state

        def step():
            self.state, metrics = self.seeds_step(self.state, x, y, indices)
            jax.block_until_ready((self.state, metrics))

        start = time.perf_counter()
        step()
        self.stepper = Stepper(
            f"{seeds} seeds ({seed_loop}: {self.loop})", step, time.perf_counter() - start
        )

    def epoch(self, index: int, max_steps: int | None) -> tuple[float, int]:
        """Train one epoch with ``train.run_epoch``: (seconds, steps)."""
        x, y = self.x, self.y
        if max_steps is not None:
            x, y = x[: max_steps * self.batch_size], y[: max_steps * self.batch_size]
        start = time.perf_counter()
        self.state, means = train.run_epoch(
            self.seeds_step, self.state, x, y, index, self.batch_size
        )
        jax.block_until_ready((self.state, means))
        return time.perf_counter() - start, x.shape[0] // self.batch_size


def _seeds_row(name, one: SeedsRun, many: SeedsRun, other: SeedsRun, wide: SeedsRun,
               settings) -> dict:
    """Time one seed against ``settings.seeds`` seeds, alternating.

    ``one`` and ``many`` use ``seed_loop="auto"``, as ``compare`` does. ``other`` runs the
    seeds with the loop that ``auto`` did not take, to show the choice. ``wide`` is one seed
    at ``settings.seeds`` times the batch: the same arithmetic as the seeds, without a seed
    axis. The number of timed steps is ``settings.steps``, or as many as fit in
    ``settings.seeds_budget_s`` seconds (at least 5) for a rule whose steps are slow.
    """
    for run in (many, other, wide):
        run.stepper.name = f"{run.stepper.name}, batch {run.batch_size}"
    steppers = [one.stepper, many.stepper, other.stepper, wide.stepper]
    start = time.perf_counter()
    for stepper in steppers:
        stepper.step()
    round_seconds = time.perf_counter() - start
    steps = min(settings.steps, max(5, int(settings.seeds_budget_s / round_seconds)))
    samples = time_round_robin(steppers, steps, settings.rounds, settings.warmup)

    def ratio(run):
        return paired_ratio(
            round_medians_ms(samples[run.stepper.name]),
            round_medians_ms(samples[one.stepper.name]),
        )

    return {
        "rule": name,
        "seeds": settings.seeds,
        "one_seed_loop": one.loop,
        "loop": many.loop,
        "other_loop": other.loop,
        "one_seed": summarize_times(flatten(samples[one.stepper.name])),
        "many_seeds": summarize_times(flatten(samples[many.stepper.name])),
        "other_seeds": summarize_times(flatten(samples[other.stepper.name])),
        "wide_batch": wide.batch_size,
        "wide_one_seed": summarize_times(flatten(samples[wide.stepper.name])),
        "ratio": ratio(many),
        "other_ratio": ratio(other),
        "wide_ratio": ratio(wide),
    }


def _epoch_row(name, run: SeedsRun, settings) -> dict[str, Any]:
    """Time epochs of ``train.run_epoch`` against steps x the median step time."""
    run.epoch(0, settings.epoch_steps)
    epoch_seconds, step_samples = [], []
    for index in range(settings.epochs):
        seconds, steps = run.epoch(index + 1, settings.epoch_steps)
        epoch_seconds.append(seconds)
        samples = time_round_robin([run.stepper], steps, 1, 1)
        step_samples += flatten(samples[run.stepper.name])
    step_ms = float(np.median(step_samples)) * 1e3
    epoch_ms = float(np.median(epoch_seconds)) * 1e3
    return {
        "rule": name,
        "seeds": settings.seeds,
        "steps_per_epoch": steps,
        "epoch_ms": epoch_ms,
        "step_ms": step_ms,
        "ratio": epoch_ms / (steps * step_ms),
    }


# --- Rules at batch 256 and the empirical NTK ----------------------------------------------------


def local_rules(workload: Workload, settings: Settings, x, y, log) -> dict[str, Any]:
    """Time the registered ``LOCAL_RULES`` (and ``LOCAL_VARIANTS``) against backprop at
    ``settings.local_batch``, for those that ``settings.rules`` selects."""
    selected = _rule_names(settings)
    present = [name for name in LOCAL_RULES if name in rules.names() and name in selected]
    result = {"batch_size": settings.local_batch, "rows": []}
    if settings.local_batch <= 0:
        return {**result, "skipped": {"all": "not measured (--local-batch 0)"}}
    if not present:
        return {**result, "skipped": {name: _absence_reason(name) for name in LOCAL_RULES}}
    network = workload.build()
    params = draw_params(network)
    batch = workloads.first_batch(x, y, settings.local_batch)
    variants = {label: spec for label, spec in LOCAL_VARIANTS.items() if spec[0] in present}
    steppers, skipped = [], {}
    for label, (name, extra) in {
        "bp": ("bp", {}), **{name: (name, {}) for name in present}, **variants
    }.items():
        log(f"  {workload.name}: rule {label} at batch {settings.local_batch}")
        try:
            steppers.append(
                rule_stepper(name, network, params, batch, settings, label=label, **extra)
            )
        except Exception as error:  # noqa: BLE001 - a broken rule is reported, not fatal
            skipped[label] = _failure(error)
    samples = time_round_robin(steppers, settings.steps, settings.rounds, settings.warmup)
    rows = [_row(stepper, samples[stepper.name], "rule") for stepper in steppers]
    reference = _find(rows, "bp")
    for row in rows:
        row["ratio_to_bp"] = None if reference is None else _pair(row, reference)
    for name in LOCAL_RULES:
        if name not in present:
            skipped[name] = _absence_reason(name)
    return {"batch_size": settings.local_batch, "rows": rows, "skipped": skipped}


def _absence_reason(name: str) -> str:
    """Return why rule ``name`` was not timed: not registered, or left out by ``--rules``."""
    return "not registered" if name not in rules.names() else "not selected by --rules"


def ntk_times(workload: Workload, settings: Settings, x, log) -> dict[str, Any]:
    """Time ``bpalt.ntk.empirical_ntk`` of ``n x n`` inputs, for each of its methods."""
    if settings.ntk_examples <= 0:
        return {"rows": [], "skipped": "not measured (--ntk-examples 0)"}
    if "ntk" not in _rule_names(settings):
        return {"rows": [], "skipped": "ntk not selected by --rules"}
    ntk, reason = _import("bpalt.ntk")
    if ntk is None or not hasattr(ntk, "empirical_ntk"):
        return {"rows": [], "skipped": reason or "bpalt.ntk has no empirical_ntk"}
    network = workload.build()
    params = draw_params(network)
    inputs = workloads.first_batch(x, x, settings.ntk_examples)[0]
    rows = []
    for method in getattr(ntk, "NTK_METHODS", (None,)):
        log(f"  {workload.name}: empirical NTK, method {method}")
        kwargs = {} if method is None else {"method": method}

        def kernel(kwargs=kwargs):
            jax.block_until_ready(ntk.empirical_ntk(network, params, inputs, **kwargs))

        start = time.perf_counter()
        kernel()
        compile_s = time.perf_counter() - start
        stepper = Stepper(f"empirical_ntk ({method or 'default'})", kernel, compile_s)
        samples = time_round_robin([stepper], settings.steps, 1, settings.warmup)
        rows.append({**_row(stepper, samples[stepper.name], "ntk"), "method": method})
    return {"examples": settings.ntk_examples, "rows": rows}


# --- The whole run ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Describe the run: package versions, machine, XLA flags, default convolution."""
    versions = reporting.environment(PACKAGES)
    machine = versions.pop("machine")
    return {
        "machine": machine,
        "versions": versions,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "conv_default": nn.conv2d.__kwdefaults__.get("implementation"),
        "blas_threads": sorted(
            {f"{pool['internal_api']} {pool['num_threads']}"
             for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"}
        ),
    }


def load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where the system has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run(
    settings: Settings, log: Callable[[str], None] = lambda message: None, results=None
) -> dict:
    """Run every measurement of ``settings``; return the results as a JSON-ready dict.

    ``results``, when given, is filled in place as each measurement finishes, so that a
    caller keeps the finished ones if the run is interrupted or fails.
    """
    results = {} if results is None else results
    results.update({
        "settings": dataclasses.asdict(settings),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "environment": environment(),
        "rules": list(_rule_names(settings)),
    })
    log("matmul rate")
    results["matmul"] = matmul_rate(settings.matmul_size)
    results["workloads"] = {}
    for name in settings.workloads:
        results["workloads"][name] = {}
        run_workload(workloads.get(name), settings, log, results["workloads"][name])
    results["load_average_end"] = load_average()
    results["targets"] = evaluate_targets(results)
    return results


def run_workload(workload: Workload, settings: Settings, log, entry=None) -> dict[str, Any]:
    """Run every measurement of one workload, filling ``entry`` (a new dict by default)."""
    x, y, source = workloads.training_data(workload, settings.data_dir)
    batch_size = settings.batch_size or workload.batch_size
    check_batch_size(workload, batch_size, x.shape[0])
    batch = workloads.first_batch(x, y, batch_size)
    log(f"{workload.name}: {source}")
    entry = {} if entry is None else entry
    entry.update({
        "description": workload.description,
        "batch_size": batch_size,
        "data": source,
        "load_average_start": load_average(),
    })
    entry["steps"] = step_times(workload, settings, batch, log)
    entry.update(seeds_and_epoch(workload, settings, x, y, log))
    if workload.name == LOCAL_WORKLOAD:
        entry["local_rules"] = local_rules(workload, settings, x, y, log)
        entry["ntk"] = ntk_times(workload, settings, x, log)
    entry["load_average_end"] = load_average()
    return entry


def check_batch_size(workload: Workload, batch_size: int, examples: int) -> None:
    """Raise ``ValueError`` when ``batch_size`` is larger than the training set.

    ``train.run_epoch`` rejects such a batch, as ``bpalt compare`` does, so the training-loop
    measurement could not run. The step timings would train on repeated examples.
    """
    if batch_size > examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the training set of {workload.name} "
            f"({examples} examples); choose --batch-size {examples} or less"
        )


# --- Targets ------------------------------------------------------------------------------------


def _pair(row, reference) -> float:
    """Return ``paired_ratio`` of two rows timed in the same rounds."""
    return paired_ratio(row["rounds_ms"], reference["rounds_ms"])


def _find(rows, name):
    """Find the row called ``name``; for a peer timed at several thread counts, the fastest."""
    matches = [row for row in rows if row["name"] == name or row["name"].startswith(name + " (")]
    return min(matches, key=lambda row: row["median_ms"]) if matches else None


def _target(name, measured, limit, unit, *, at_least=False, note=""):
    """Build one target: ``measured <= limit`` (``>=`` with ``at_least``), None if unmeasured."""
    met = None
    if measured is not None:
        met = bool(measured >= limit) if at_least else bool(measured <= limit)
    return {"target": name, "measured": measured, "limit": limit, "unit": unit,
            "at_least": at_least, "met": met, "note": note}


def evaluate_targets(results: dict) -> list[dict]:
    """List every target: the measured value, its limit and whether it is met.

    A target that this run did not measure (a rule not selected, a part skipped by an
    option, a peer not installed) is listed as not measured, with the reason as its note.
    """
    targets = []
    for name, entry in results["workloads"].items():
        steps = entry["steps"]
        targets += _step_targets(name, steps["rows"], steps["skipped"], results["matmul"])
        targets.append(_seeds_target(name, entry))
        if name == LOCAL_WORKLOAD:
            targets += _local_targets(entry.get("local_rules") or {})
            targets.append(_ntk_target(entry.get("ntk") or {}))
    return targets


def _ntk_target(ntk) -> dict:
    """Build the target on the fastest empirical NTK method, or give the reason it is missing."""
    examples = ntk.get("examples", Settings().ntk_examples)
    name = f"W1: empirical NTK of {examples} inputs ({examples} x {examples} kernel)"
    if not ntk.get("rows"):
        return _target(name, None, 30.0, "ms", note=ntk.get("skipped", "not measured"))
    best = min(ntk["rows"], key=lambda row: row["median_ms"])
    return _target(name, best["median_ms"], 30.0, "ms", note=best["name"])


def _seeds_target(workload: str, entry) -> dict:
    """Build the target on several seeds of bp in one step against one seed.

    With one seed both steps train a single seed, so the target is not measured.
    """
    row = next((r for r in entry.get("seeds", []) if r["rule"] == "bp"), None)
    if row is None:
        reason = entry.get("skipped", {}).get("bp", "bp not in --seed-rules")
        return _target(f"{workload}: seeds / 1 seed (bp)", None, 1.6, "x", note=reason)
    if row["seeds"] < 2:
        return _target(f"{workload}: seeds / 1 seed (bp)", None, 1.6, "x",
                       note=f"needs --seeds 2 or more, got {row['seeds']}")
    return _target(f"{workload}: {row['seeds']} seeds / 1 seed (bp, {row['loop']})",
                   row["ratio"], 1.6, "x",
                   note=f"one seed at {row['seeds']}x the batch: {row['wide_ratio']:.2f}x")


def _step_targets(workload: str, rows, skipped, matmul) -> list[dict]:
    """List the step-time targets of one workload from its rows.

    Without a bp row (not selected, or failed), each target that needs bp is listed as not
    measured with that reason, and the rules' targets against their peers are still judged.
    """
    targets = []
    bp, torch_row = _find(rows, "bp"), _find(rows, "PyTorch eager")
    no_bp = skipped.get("bp", "bp not selected by --rules")

    def needs_bp(name, limit, unit, measure, note=""):
        # measure(bp) gives the value. Without bp, the target is listed as not measured.
        if bp is None:
            return _target(name, None, limit, unit, note=no_bp)
        return _target(name, measure(bp), limit, unit, note=note)

    targets.append(needs_bp(f"{workload}: bp / jax.grad + optax step", 1.05, "x",
                            lambda bp: bp["ratio_to_reference"]))

    name = f"{workload}: bp / PyTorch eager"
    if torch_row is None:
        targets.append(_target(name, None, 1.0, "x", note=_peer_note(skipped, "PyTorch eager")))
    else:
        targets.append(needs_bp(name, 1.0, "x", lambda bp: _pair(bp, torch_row),
                                note=torch_row["name"]))

    if workload == "W2":
        note = "PyTorch eager's time on an idle machine"
        if torch_row is not None:
            note += f"; this run: {_ms(torch_row['median_ms'])} ms"
        targets.append(needs_bp("W2: bp step", 4.7, "ms", lambda bp: bp["median_ms"], note))

    for rule, limit in (("fa", 1.15), ("dfa", 1.10)):
        row = _find(rows, rule)
        if row is None:
            reason = skipped.get(rule, "not selected by --rules")
            targets.append(_target(f"{workload}: {rule} / bp", None, limit, "x", note=reason))
            continue
        targets.append(needs_bp(f"{workload}: {rule} / bp", limit, "x",
                                lambda bp, row=row: _pair(row, bp)))
        peer = _find(rows, f"BioTorch {rule}")
        targets.append(_target(
            f"{workload}: {rule} / BioTorch {rule}",
            None if peer is None else _pair(row, peer),
            1.0, "x",
            note=peer["name"] if peer else _peer_note(skipped, f"BioTorch {rule}"),
        ))

    es, evosax = _find(rows, "es"), next((r for r in rows if r["name"].startswith("evosax")), None)
    if es is None and workload == "W1":
        targets.append(_target("W1: es generation / evosax Open_ES", None, 0.6, "x",
                               note=skipped.get("es", "es not selected by --rules")))
    if es is not None and workload == "W1":
        targets.append(_target(
            "W1: es generation / evosax Open_ES",
            None if evosax is None else _pair(es, evosax),
            0.6, "x",
            note="" if evosax is not None else _peer_note(skipped, "evosax Open_ES"),
        ))

    if workload == "W2":
        targets.append(_stretch_target(bp, rows, matmul, no_bp))
    return targets


def _stretch_target(bp, rows, matmul, no_bp: str) -> dict:
    """Build W2's stretch target: bp's FLOP rate as a fraction of the matmul's."""
    name = "W2 (stretch): bp FLOP rate / matmul rate"
    machine = gflops(_find(rows, MATMUL) or {}) or matmul.get("gflops")
    if bp is None:
        return _target(name, None, 0.30, "fraction", at_least=True, note=no_bp)
    if matmul["size"] < SMALL_MATMUL:
        # A small matmul runs below the machine's rate, so the fraction would flatter.
        return _target(name, None, 0.30, "fraction", at_least=True,
                       note=f"needs --matmul-size {SMALL_MATMUL} or more")
    if not bp.get("flops") or not machine:
        return _target(name, None, 0.30, "fraction", at_least=True,
                       note="no FLOP count or matmul rate in this run")
    return _target(name, gflops(bp) / machine, 0.30, "fraction", at_least=True,
                   note=f"bp {gflops(bp):.1f} of {machine:.1f} GFLOP/s")


def _peer_note(skipped: dict[str, str], name: str) -> str:
    """Return why peer ``name`` has no row: its own skip reason (such as not installed), or
    that ``--no-peers`` left the optional peers out."""
    if name in skipped:
        return skipped[name]
    if NO_PEERS in skipped:
        return f"{name} not run: --no-peers"
    return "not measured"


def _local_targets(local) -> list[dict]:
    """Build the targets of the local rules at ``local["batch_size"]`` against bp."""
    batch_size = local.get("batch_size") or Settings().local_batch

    def target(name, measured, note=""):
        return _target(f"{LOCAL_WORKLOAD}: {name} / bp at batch {batch_size}", measured, 2.0,
                       "x", note=note)

    if not local.get("batch_size"):
        return [target(name, None, "not measured (--local-batch 0)") for name in LOCAL_RULES]

    targets = []
    for row in local["rows"]:
        if row["name"] in LOCAL_RULES:
            targets.append(target(row["name"], row["ratio_to_bp"], _variant_note(row, local)))
        elif row["name"] in LOCAL_VARIANTS:
            targets.append(target(row["name"], row["ratio_to_bp"], "not the registered default"))
    for name, reason in local.get("skipped", {}).items():
        if name in LOCAL_RULES or name in LOCAL_VARIANTS:
            targets.append(target(name, None, reason))
    return targets


def _variant_note(row, local) -> str:
    """Return the note of a local rule's target: each variant's ratio to bp in the same run
    (such as HSIC with the plain estimator) and the time that the rule's default adds."""
    parts = []
    for label, (rule, _) in LOCAL_VARIANTS.items():
        variant = _find(local["rows"], label)
        if rule != row["name"] or variant is None or variant["ratio_to_bp"] is None:
            continue
        # From the medians as the table prints them, so that the note matches the table.
        added = float(_ms(row["median_ms"])) - float(_ms(variant["median_ms"]))
        parts.append(
            f"{label}: {variant['ratio_to_bp']:.2f} x; the default took {added:.2f} ms more"
        )
    return "; ".join(parts)


# --- Markdown -----------------------------------------------------------------------------------


def _ms(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not rows:
        return ["Not measured in this run.", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _target_lines(targets) -> list[str]:
    rows = []
    for t in targets:
        measured = t["measured"]
        relation = ">=" if t["at_least"] else "<="
        if t["unit"] == "fraction":
            shown = "" if measured is None else f"{measured:.1%}"
            limit = f"{relation} {t['limit']:.0%}"
        else:
            shown = "" if measured is None else f"{measured:.2f} {t['unit']}"
            limit = f"{relation} {t['limit']:g} {t['unit']}"
        verdict = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        rows.append((t["target"], shown, limit, verdict, t["note"]))
    return _table(("target", "measured", "limit", "verdict", "note"), rows)


def _step_lines(entry) -> list[str]:
    rows = []
    for row in entry["steps"]["rows"]:
        memory = row["memory_mib"]
        rows.append((
            row["name"], row["kind"], _ms(row["median_ms"]),
            f"{_ms(row['p25_ms'])}-{_ms(row['p75_ms'])}", f"{row['ratio_to_reference']:.2f}",
            "" if row["compile_s"] is None else f"{row['compile_s']:.2f}",
            "" if memory is None else f"{memory:.1f}",
        ))
    lines = _table(("step", "kind", "ms median", "ms p25-p75", "ratio to jax.grad + optax",
                    "compile s", "XLA memory MiB"), rows)
    for name, reason in entry["steps"]["skipped"].items():
        lines.append(f"- {OPTIONAL_PEERS if name == NO_PEERS else name}: skipped, {reason}")
    return lines + ([""] if entry["steps"]["skipped"] else [])


MAX_MATMUL = 8192
"""Largest ``--matmul-size``: its three float32 matrices take 768 MiB."""
MAX_BENCH_SEEDS = 16
"""Largest ``--seeds``: the seeds measurement also runs them under ``vmap``, where every
seed's activations are live at once (the arrays of one W2 backprop step sum to 110 MiB)."""
MAX_ES_POPULATION = 4096
"""Largest ``--es-population``. ES at 256 used 137 MiB of XLA buffers on W2, and an
estimated 16 times that (2.2 GiB) at this cap, if memory grows with the population."""
SMALL_MATMUL = 1024
"""Matmul side below which the measured rate understates the machine's."""


def _small_matmul_note(size: int) -> str:
    """Return a warning when ``--matmul-size`` is too small to measure the machine's rate."""
    if size >= SMALL_MATMUL:
        return ""
    return (
        f" A {size}x{size} matmul is too small to reach the machine's rate (use at least "
        f"{SMALL_MATMUL}), so the FLOP fractions below overstate the steps' efficiency."
    )


def gflops(row) -> float | None:
    """Return a row's achieved GFLOP/s from its FLOP count and median time, or None."""
    return None if not row.get("flops") else row["flops"] / (row["median_ms"] * 1e-3) / 1e9


def _flop_lines(results) -> list[str]:
    """Tabulate each backprop row's FLOP rate against the matmul of the same rounds."""
    rows = []
    for name, entry in results["workloads"].items():
        machine = gflops(_find(entry["steps"]["rows"], MATMUL) or {}) or results["matmul"]["gflops"]
        for row in entry["steps"]["rows"]:
            if row["flops"]:
                achieved = gflops(row)
                rows.append((name, row["name"], f"{row['flops'] / 1e6:.1f}",
                             _ms(row["median_ms"]), f"{achieved:.1f}", f"{achieved / machine:.1%}"))
    return _table(("workload", "step", "MFLOP per step", "ms median", "GFLOP/s",
                   "fraction of the matmul rate (same rounds)"), rows)


def _seed_lines(entry) -> list[str]:
    rows = [
        (r["rule"], _ms(r["one_seed"]["median_ms"]),
         f"{_ms(r['many_seeds']['median_ms'])} ({r['loop']})", f"{r['ratio']:.2f}",
         f"{_ms(r['other_seeds']['median_ms'])} ({r['other_loop']})", f"{r['other_ratio']:.2f}",
         f"{_ms(r['wide_one_seed']['median_ms'])} (batch {r['wide_batch']})",
         f"{r['wide_ratio']:.2f}", r["one_seed"]["steps"])
        for r in entry.get("seeds", [])
    ]
    seeds = entry["seeds"][0]["seeds"] if entry.get("seeds") else "N"
    return _table(
        ("rule", "1 seed ms", f"{seeds} seeds ms, auto loop", "ratio",
         f"{seeds} seeds ms, other loop", "ratio", f"1 seed ms, {seeds}x batch", "ratio",
         "timed steps"),
        rows,
    )


def _epoch_lines(entry) -> list[str]:
    rows = [
        (r["rule"], r["seeds"], r["steps_per_epoch"], _ms(r["epoch_ms"]), _ms(r["step_ms"]),
         f"{r['ratio']:.2f}")
        for r in entry.get("epochs", [])
    ]
    return _table(("rule", "seeds in each step", "steps", "epoch ms", "step ms",
                   "epoch / (steps x step)"), rows)


def _local_lines(local) -> list[str]:
    rows = [
        (r["name"], _ms(r["median_ms"]), f"{_ms(r['p25_ms'])}-{_ms(r['p75_ms'])}",
         "" if r["ratio_to_bp"] is None else f"{r['ratio_to_bp']:.2f}")
        for r in local.get("rows", [])
    ]
    lines = _table(("rule", "ms median", "ms p25-p75", "ratio to bp"), rows)
    skipped = local.get("skipped", {})
    lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
    return lines + ([""] if skipped else [])


def _ntk_lines(ntk) -> list[str]:
    rows = [
        (r["name"], _ms(r["median_ms"]), f"{_ms(r['p25_ms'])}-{_ms(r['p75_ms'])}",
         f"{r['compile_s']:.2f}")
        for r in ntk.get("rows", [])
    ]
    if not rows and ntk.get("skipped"):
        return [f"Skipped: {ntk['skipped']}.", ""]
    lines = _table(("kernel", "ms median", "ms p25-p75", "first call s"), rows)
    if ntk.get("skipped"):
        lines += [f"- skipped: {ntk['skipped']}", ""]
    return lines


def markdown(results: dict, command: str, notes: str = "") -> str:
    """Render the results as Markdown: targets, then each measurement's table."""
    env = results["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}`",
        "",
        f"Run {results['started']} on {env['machine']}; {versions}; XLA_FLAGS "
        f"`{env['xla_flags'] or '(none)'}`; conv2d default implementation "
        f"`{env['conv_default']}`; BLAS threads "
        f"{', '.join(env.get('blas_threads', [])) or 'unknown'}. "
        "Load average (1, 5, 15 min) at the start "
        f"{results['load_average_start']}, at the end {results['load_average_end']}.",
        "",
        f"Times are medians of {results['settings']['steps']} timed steps per row, after "
        f"compilation and warm-up, taken in "
        f"{max(1, min(results['settings']['rounds'], results['settings']['steps']))} "
        "round(s) that "
        "alternate between the rows of a workload. A ratio between two rows is the median "
        "over rounds of the ratio of their per-round medians, so each compares the rows "
        "under the same machine load. Memory is XLA's buffers for one step (arguments, "
        "outputs and temporaries).",
        "",
        "## Targets",
        "",
        *_target_lines(results["targets"]),
        f"Matmul rate: float32 {results['matmul']['size']}x{results['matmul']['size']} in "
        f"{results['matmul']['median_ms']:.2f} ms, {results['matmul']['gflops']:.1f} GFLOP/s, "
        "timed alone before the workloads. Each workload times the same matmul again in its "
        f"rounds (its row `{MATMUL}`), and the FLOP fractions use that rate."
        + _small_matmul_note(results["matmul"]["size"]),
        "",
    ]
    for name, entry in results["workloads"].items():
        lines += [
            f"## {name}: {entry['description']}, batch {entry['batch_size']}",
            "",
            f"Data: {entry['data']}. Load average at the start {entry['load_average_start']}, "
            f"at the end {entry['load_average_end']}.",
            "",
            "### Step time per rule and peer",
            "",
            *_step_lines(entry),
            f"### {name}: seeds in one compiled step (`train.make_seeds_step`)",
            "",
            *_seed_lines(entry),
            f"### {name}: training loop (`train.run_epoch`)",
            "",
            *_epoch_lines(entry),
        ]
        skipped = entry.get("skipped", {})
        lines += [f"- {rule}: skipped, {reason}" for rule, reason in skipped.items()]
        lines += [""] if skipped else []
        if "local_rules" in entry:
            local_batch = entry["local_rules"].get("batch_size") or 0
            heading = f"rules at batch {local_batch}" if local_batch > 0 else "local rules"
            lines += [f"### {name}: {heading}", "", *_local_lines(entry["local_rules"])]
        if "ntk" in entry:
            examples = entry["ntk"].get("examples")
            heading = f"empirical NTK, {examples} inputs" if examples else "empirical NTK"
            lines += [f"### {name}: {heading}", "", *_ntk_lines(entry["ntk"])]
    lines += ["## Backprop FLOP rate", "", *_flop_lines(results)]
    lines += [NOTES_MARKER, "", notes.strip(), ""] if notes.strip() else [NOTES_MARKER, ""]
    return "\n".join(lines)


def existing_notes(path: Path) -> str:
    """Return the hand-written notes below ``NOTES_MARKER`` in ``path``, or ``""``."""
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    return text.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in text else ""


def output_paths(out: Path) -> tuple[Path, Path]:
    """Return the paths ``<out>.md`` and ``<out>.json``.

    The suffixes are appended, so that ``--out runs/bench.1`` and ``--out runs/bench.2``
    write different files. An ``--out`` that already ends in ``.md`` or ``.json`` drops it.
    """
    out = Path(out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    return out.with_name(out.name + ".md"), out.with_name(out.name + ".json")


def write_results(results: dict, out: Path, command: str) -> tuple[Path, Path]:
    """Write ``<out>.md`` and ``<out>.json``, keeping the notes of an earlier ``<out>.md``."""
    md_path, json_path = output_paths(out)
    results = {**results, "command": command}
    checkpoint.write_atomic(json_path, json.dumps(results, indent=1, default=str) + "\n")
    checkpoint.write_atomic(md_path, markdown(results, command, existing_notes(md_path)))
    return md_path, json_path


# --- Command line -------------------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    """Split a comma-separated list, dropping repeated names; blanks alone are the empty list."""
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        return ()
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return tuple(dict.fromkeys(names))


def build_parser(default_out: str = "benchmarks") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bpalt bench",
        description="Time every registered rule, the hand-written JAX step and peer libraries.",
    )
    defaults = Settings()
    parser.add_argument("--workloads", type=_names, default=defaults.workloads,
                        help="comma-separated workloads: W1 (digits CNN, batch 64), W2 "
                        "(LeNet on 28x28, batch 128); default W1,W2")
    parser.add_argument("--rules", type=_names, help="comma-separated rules (default: all)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="timed steps per row (default 30)")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds the timed steps are split into (default {defaults.rounds}, "
                        "or --steps when fewer)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup,
                        help="untimed steps after compiling (default 3); every round also "
                        "runs one untimed step per row")
    parser.add_argument("--batch-size", type=int,
                        help="override every workload's batch size (at most the number of "
                        "training examples)")
    parser.add_argument("--data-dir",
                        help="folder with the MNIST t10k IDX files (10,000 images) for W2; "
                        "without it W2 runs on random data")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch, BioTorch, evosax")
    parser.add_argument("--seeds", type=int, default=defaults.seeds,
                        help=f"seeds in one step, against one seed (default 3, at most "
                        f"{MAX_BENCH_SEEDS})")
    parser.add_argument("--seed-rules", type=_names,
                        help="rules of the seeds measurement (default: those of --rules; an "
                        "empty list skips it)")
    parser.add_argument("--epoch-rules", type=_names, default=defaults.epoch_rules,
                        help="rules of the training-loop measurement (default bp; an empty "
                        "list skips it)")
    parser.add_argument("--seeds-budget", type=float, default=defaults.seeds_budget_s,
                        help="seconds the seeds measurement of one rule may take (default 30)")
    parser.add_argument("--es-population", type=int, default=defaults.es_population,
                        help="population of the ES rule and of evosax's Open_ES: even, at "
                        f"most {MAX_ES_POPULATION} (default 256)")
    parser.add_argument("--local-batch", type=int, default=defaults.local_batch,
                        help="batch of the HSIC / Greedy InfoMax comparison, at most W1's "
                        f"training examples (default {defaults.local_batch}; 0 skips it)")
    parser.add_argument("--ntk-examples", type=int, default=defaults.ntk_examples,
                        help="inputs of the empirical NTK timing, at most W1's training "
                        f"examples (default {defaults.ntk_examples}; 0 skips it)")
    parser.add_argument("--matmul-size", type=int, default=defaults.matmul_size,
                        help="side of the float32 matmul that gives the machine's FLOP rate "
                        f"(default 2048, at most {MAX_MATMUL})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="timed epochs of the training-loop measurement, after one "
                        f"untimed epoch (default {defaults.epochs}; 0 skips it)")
    parser.add_argument("--epoch-steps", type=int,
                        help="cap the steps of each timed epoch (default: the whole set)")
    parser.add_argument("--out", default=default_out,
                        help="output path without suffix: writes OUT.md and OUT.json, "
                        f"creating missing folders (default {default_out})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated ``Settings`` from parsed arguments; ``ValueError`` names a bad value."""
    if args.rounds is None:
        args.rounds = min(Settings().rounds, max(args.steps, 1))
    for name in ("steps", "rounds", "seeds", "es_population", "matmul_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                             f"got {getattr(args, name)}")
    for name in ("warmup", "local_batch", "ntk_examples", "epochs"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "epoch_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.rounds > args.steps:
        raise ValueError(
            f"--rounds {args.rounds} is more than --steps {args.steps}; every round times at "
            "least one step, so use at most as many rounds as steps"
        )
    if args.matmul_size > MAX_MATMUL:
        raise ValueError(
            f"--matmul-size must be at most {MAX_MATMUL} (three {MAX_MATMUL}x{MAX_MATMUL} "
            f"float32 matrices take 768 MiB), got {args.matmul_size}"
        )
    if args.seeds > MAX_BENCH_SEEDS:
        raise ValueError(
            f"--seeds must be at most {MAX_BENCH_SEEDS} (under vmap every seed's activations "
            f"are live at once), got {args.seeds}"
        )
    if args.es_population > MAX_ES_POPULATION:
        raise ValueError(
            f"--es-population must be at most {MAX_ES_POPULATION} (ES keeps one perturbation "
            "of every parameter per member, and 256 is the population of the evosax "
            f"comparison), got {args.es_population}"
        )
    if args.es_population < 2 or args.es_population % 2:
        raise ValueError(
            "--es-population must be an even integer >= 2 (the ES rule samples antithetic "
            f"pairs), got {args.es_population}"
        )
    if args.data_dir is not None and not any(
        workloads.get(name).needs_data_dir for name in args.workloads
    ):
        raise ValueError(
            f"--data-dir {args.data_dir} is not used by workload(s) "
            f"{', '.join(args.workloads)}; only W2 reads MNIST from a folder. Remove it, or "
            "add W2 to --workloads"
        )
    if not math.isfinite(args.seeds_budget) or args.seeds_budget <= 0:
        raise ValueError(
            f"--seeds-budget must be a positive number of seconds, got {args.seeds_budget}"
        )
    if not args.workloads:
        raise ValueError(f"--workloads is empty; accepted: {', '.join(workloads.WORKLOADS)}")
    for name in args.workloads:
        workloads.get(name)
    if args.rules is not None and not args.rules:
        raise ValueError(f"--rules is empty; accepted: {', '.join(rules.names())}, or leave "
                         "out --rules to measure every rule")
    for names in (args.rules, args.seed_rules, args.epoch_rules):
        check_rule_names(names or ())
    return Settings(
        workloads=tuple(dict.fromkeys(workloads.get(n).name for n in args.workloads)),
        rules=args.rules,
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        peers=not args.no_peers,
        seeds=args.seeds,
        seed_rules=args.seed_rules,
        epoch_rules=args.epoch_rules,
        seeds_budget_s=args.seeds_budget,
        es_population=args.es_population,
        local_batch=args.local_batch,
        ntk_examples=args.ntk_examples,
        matmul_size=args.matmul_size,
        epochs=args.epochs,
        epoch_steps=args.epoch_steps,
    )


def check_out(out: str | Path) -> None:
    """Raise ``ValueError`` unless ``<out>.md`` and ``<out>.json`` can be written.

    Checked before timing starts, so that a bad ``--out`` costs no measurement.
    """
    if not str(out).strip():
        raise ValueError("--out is blank; name the output files without their suffix, "
                         "e.g. --out benchmarks")
    out = Path(out)
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder, but it names the output files without their suffix; "
            f"use --out {out / 'benchmarks'} to write benchmarks.md and benchmarks.json there"
        )
    for path in output_paths(out):
        if path.is_dir():
            raise ValueError(f"--out would write {path}, which is a folder; choose another --out")
    checkpoint.check_writable(out)


def check_training_sets(settings: Settings) -> None:
    """Load each workload's training set and check the batch size against it.

    Called before any timing starts, so that a missing or incomplete ``--data-dir`` and a
    batch larger than the training set cost no measurement. ``run`` loads the sets again.
    """
    for name in settings.workloads:
        workload = workloads.get(name)
        x, _, _ = workloads.training_data(workload, settings.data_dir)
        check_batch_size(workload, settings.batch_size or workload.batch_size, x.shape[0])
        if name != LOCAL_WORKLOAD:
            continue
        for option, value in (("--local-batch", settings.local_batch),
                              ("--ntk-examples", settings.ntk_examples)):
            if value > x.shape[0]:
                raise ValueError(
                    f"{option} {value} is more than {name}'s {x.shape[0]} training examples; "
                    f"use at most {x.shape[0]}, or 0 to skip that measurement"
                )


def main(
    argv: Sequence[str] | None = None, command: str | None = None, default_out: str = "benchmarks"
) -> int:
    """Run the benchmark from the command line; write ``--out``.md and ``--out``.json.

    A bad value prints one line and returns ``USAGE_ERROR`` before any timing. A value
    argparse cannot parse exits with that status instead. ``command`` is the command line
    recorded in the output (default: ``python -m bpalt.bench`` and the arguments), and
    ``default_out`` the ``--out`` used when none is given.

    After Ctrl-C (status ``INTERRUPTED``) or a failure during timing (status 1), the
    measurements finished so far are saved as JSON in the system's temporary folder, and
    the message names that file.
    """
    parser = build_parser(default_out)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(usage_line(parser.prog, str(error)), file=sys.stderr)
        return USAGE_ERROR
    try:
        check_out(args.out)
        check_training_sets(settings)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted before timing; nothing was measured",
              file=sys.stderr)
        return INTERRUPTED
    argv = sys.argv[1:] if argv is None else list(argv)
    if command is None:
        command = "python -m bpalt.bench " + " ".join(shlex.quote(a) for a in argv)

    start = time.perf_counter()

    def log(message):
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {}
    try:
        # Spinning OpenBLAS threads slow XLA down (see ``cli.limit_blas_threads``).
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            run(settings, log, results)
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the rescue file short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        rescue = _rescue(results, command.strip(), stopped="interrupted")
        print(f"{parser.prog}: interrupted; the measurements finished so far are in {rescue}",
              file=sys.stderr)
        return INTERRUPTED
    except Exception as error:  # noqa: BLE001 - keep what was measured, then report
        failure = _failure(error)
        rescue = _rescue(results, command.strip(), stopped=failure)
        print(f"{parser.prog}: error: {failure}; the measurements finished so far are in "
              f"{rescue}", file=sys.stderr)
        return 1
    try:
        md_path, json_path = write_results(results, Path(args.out), command.strip())
    except OSError as error:
        # The folder was checked before timing, but it can still change during the run.
        rescue = _rescue(results, command.strip())
        print(f"{parser.prog}: error: {error}; the measurements are in {rescue}",
              file=sys.stderr)
        return 1
    print(f"wrote {md_path} and {json_path}")
    return 0


def _rescue(results: dict, command: str, stopped: str | None = None) -> Path:
    """Write ``results`` as JSON to a new file in the system's temporary folder.

    ``stopped``, the reason a run ended early, is recorded under the key ``"stopped"``.
    """
    handle, path = tempfile.mkstemp(prefix="bpalt-bench-", suffix=".json")
    record = {**results, "command": command}
    if stopped is not None:
        record["stopped"] = stopped
    with os.fdopen(handle, "w") as file:
        json.dump(record, file, indent=1, default=str)
    return Path(path)


if __name__ == "__main__":
    exit_process(main())
