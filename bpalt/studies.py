"""Textbook experiments on backprop itself: weight initialisation and gradients through depth.

- ``init_study``: a deep plain MLP and the default CNN, each with zero, small normal, large
  normal, He and Xavier initialisation under sigmoid, tanh and ReLU, trained with backprop
  and SGD on the digits. Each row reports the final test accuracy, the per-layer gradient
  norms at initialisation and how many distinct hidden units each layer has after training
  (zero initialisation leaves every unit of a layer identical: the symmetry problem).
- ``depth_study``: the first-layer gradient norm at initialisation of MLPs of 2 to 20 dense
  layers, per activation and initialisation, on one batch of digits (vanishing and
  exploding gradients).

Both return rows (dicts with the documented columns) and render Markdown tables with
``tabulate``. The command line writes the result files::

    python -m bpalt.studies init --out experiments/results
    python -m bpalt.studies depth --out experiments/results
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tabulate import tabulate

from bpalt import checkpoint, data, diagnostics, initializers, losses, models, nn, rules, train
from bpalt.argtypes import USAGE_ERROR, positive_float, positive_int

INITS = {
    "zeros": initializers.zeros,
    "normal(0.01)": initializers.normal(0.01),
    "normal(1.0)": initializers.normal(1.0),
    "he": initializers.he_normal(),
    "xavier": initializers.xavier_normal(),
}
"""The weight initialisations compared, by the names used in the tables."""

ACTIVATIONS = ("sigmoid", "tanh", "relu")
ARCHITECTURES = ("mlp", "cnn")

STANDARD_INIT = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he"}
"""The initialisation each activation was designed with: Xavier (Glorot and Bengio 2010)
for sigmoid and tanh, He (He et al. 2015, arXiv:1502.01852) for ReLU."""

INIT_COLUMNS = (
    "network",
    "activation",
    "init",
    "test_accuracy",
    "grad_norm_first",
    "grad_norm_last",
    "grad_ratio",
    "unit_spread",
    "distinct_units",
    "diverged",
)
"""Columns of an ``init_study`` row.

- ``test_accuracy``: final test accuracy in percent, mean over seeds.
- ``grad_norm_first``, ``grad_norm_last``: norm of the first and of the last (output)
  layer's backprop gradient at initialisation, mean over seeds (``grad_norm`` in
  ``bpalt.diagnostics``).
- ``grad_ratio``: ``grad_norm_first / grad_norm_last``, nan when both are 0.
- ``unit_spread``: after training, the maximum over hidden layers and units of the distance
  between a unit's incoming weights (with its bias) and the layer's mean unit; max over
  seeds. 0 means every unit of every hidden layer is the same.
- ``distinct_units``: after training, the number of distinct units in each hidden layer
  (a tuple, first seed); units closer than 1e-4 times the layer's largest entry count as one.
- ``diverged``: how many seeds stopped because their loss became non-finite.
"""

DEPTH_COLUMNS = ("activation", "init", "depth", "grad_norm_first", "grad_norm_last")
"""Columns of a ``depth_study`` row: the gradient norms of the first and last (output)
dense layer at initialisation, mean over seeds; ``init`` is a key of ``INITS``."""


@dataclasses.dataclass(frozen=True)
class InitStudySettings:
    """Networks and training of the initialisation study.

    Attributes:
        mlp_depth: dense layers of the MLP, the output layer included.
        mlp_width: units per hidden layer of the MLP.
        cnn_channels: channels of the default CNN's two convolution blocks.
        epochs, batch_size, learning_rate, momentum: SGD with momentum (optax ``sgd``).
        seeds: runs per configuration, seeds 0 .. seeds - 1.
        gradient_batch: training examples in the batch for the gradient norms at
            initialisation.
    """

    mlp_depth: int = 6
    mlp_width: int = 64
    cnn_channels: tuple[int, ...] = (16, 32)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.9
    seeds: int = 2
    gradient_batch: int = 256


# --- Networks and their hidden units ------------------------------------------------------


def build_network(
    architecture: str,
    activation: str,
    init: str,
    input_shape: Sequence[int] = (8, 8, 1),
    settings: InitStudySettings | None = None,
) -> nn.Network:
    """Build the study's ``"mlp"`` (``models.mlp``) or ``"cnn"`` (``models.digits_cnn``).

    ``init`` (a key of ``INITS``) sets every dense weight of the MLP; biases start at zero.
    In the CNN it sets the convolution kernels and the output layer stays LeCun normal,
    as ``models.digits_cnn`` defines it.
    """
    settings = settings or InitStudySettings()
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; accepted: {ARCHITECTURES}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
    if architecture == "mlp":
        hidden = [settings.mlp_width] * (settings.mlp_depth - 1)
        return models.mlp(input_shape, hidden, activation=activation, w_init=INITS[init])
    return models.digits_cnn(
        input_shape, channels=settings.cnn_channels, w_init=INITS[init], activation=activation
    )


def linear_layers(params) -> list[dict]:
    """Collect the params of every dense and convolution layer (dicts with ``"w"``) in order."""
    if isinstance(params, dict):
        return [params] if "w" in params else []
    if isinstance(params, (tuple, list)):
        return [layer for item in params for layer in linear_layers(item)]
    return []


def unit_vectors(layer: dict) -> np.ndarray:
    """Arrange each output unit's incoming weights and bias as one row: (units, fan_in + 1).

    Unit j of a dense ``w`` (in, units) is column j. Unit j of a convolution kernel
    (h, w, in, units) is output channel j's whole kernel, which every position shares.
    """
    weights = np.asarray(layer["w"], np.float64)
    units = weights.shape[-1]
    rows = weights.reshape(-1, units).T
    if "b" in layer:
        rows = np.concatenate([rows, np.asarray(layer["b"], np.float64)[:, None]], axis=1)
    return rows


def unit_spread(layer: dict) -> float:
    """Maximum distance of a unit's incoming weights (and bias) from the layer's mean unit."""
    rows = unit_vectors(layer)
    return float(np.max(np.linalg.norm(rows - rows.mean(axis=0), axis=1)))


def count_distinct_units(layer: dict, rtol: float = 1e-4) -> int:
    """Number of distinct units: rows of ``unit_vectors`` farther apart than the tolerance.

    Two units are the same when no entry differs by more than ``rtol`` times the layer's
    largest absolute entry. Units that started identical stay equal only up to float
    rounding, which this tolerance absorbs.
    """
    rows = unit_vectors(layer)
    tolerance = rtol * max(float(np.max(np.abs(rows))), 1e-30)
    representatives: list[np.ndarray] = []
    for row in rows:
        if not any(np.max(np.abs(row - other)) <= tolerance for other in representatives):
            representatives.append(row)
    return len(representatives)


def _member(tree, index: int):
    """Entry ``index`` of a pytree stacked on a leading axis."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


# --- Gradient norms at initialisation -----------------------------------------------------


def _layer_gradient_norms(network: nn.Network, loss, params, batch) -> dict[str, jax.Array]:
    """``{layer name: norm}`` of the backprop gradient, as ``grad_norm/<layer>`` defines it."""
    grads = diagnostics.backprop_gradient(network, loss, params, batch)
    norms = diagnostics.grad_norms(grads)
    return {name.split("/", 1)[1]: value for name, value in norms.items()}


def make_gradient_norms(network: nn.Network, loss=losses.softmax_cross_entropy):
    """Return a jitted ``(stacked params, batch) -> {layer name: norms (members,)}``.

    Each norm is ``grad_norm/<layer>`` of ``bpalt.diagnostics`` for one member of params
    stacked on a leading axis.
    """

    def one(params, batch):
        return _layer_gradient_norms(network, loss, params, batch)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def _gradient_norms_at_init(network: nn.Network, keys, batch) -> dict[str, np.ndarray]:
    """Layer gradient norms of ``network`` initialised from each key: (len(keys),) each.

    Runs eagerly: the depth study builds a new network per point, and compiling each one
    takes longer than running it, while eager operations compile once per shape and are
    shared by every depth.
    """
    per_key = [
        _layer_gradient_norms(network, losses.softmax_cross_entropy, network.init(key), batch)
        for key in keys
    ]
    return {name: np.array([float(norms[name]) for norms in per_key]) for name in per_key[0]}


def _layer_position(name: str) -> tuple[int, ...]:
    """Sort key of a layer name such as ``block12.0``: (12, 0), so block10 follows block9."""
    return tuple(int(part) for part in name.removeprefix("block").split("."))


def first_and_last(norms: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return the first and the last layer's entries of a ``{layer name: value}`` dict.

    Layers are ordered by position, not by key order: ``jax.jit`` returns dict outputs
    with keys sorted as strings, which puts ``block10`` before ``block2``.
    """
    names = sorted(norms, key=_layer_position)
    return np.asarray(norms[names[0]]), np.asarray(norms[names[-1]])


def _ratio(first: float, last: float) -> float:
    if last == 0.0:
        return math.nan if first == 0.0 else math.inf
    return first / last


# --- Initialisation study -----------------------------------------------------------------


def _initial_states(networks, rule, optimizer, seeds: int):
    """Build one ``train.TrainState`` per (network, seed), stacked in network-major order.

    All networks share one structure and differ only in their initial weights, so one
    compiled step trains them all under ``vmap``. The states are built eagerly: XLA on CPU
    takes seconds to compile the random draws of a whole network inside ``jit``, while eager
    draws compile once per weight shape and are reused across networks.
    """
    states = [
        train.init_train_state(rule, network, optimizer, jax.random.key(seed))
        for network in networks
        for seed in range(seeds)
    ]
    return _stack(states)


def train_initialisations(
    architecture: str,
    activation: str,
    inits: Sequence[str],
    dataset: data.Dataset,
    settings: InitStudySettings,
) -> list[dict]:
    """Train one network per initialisation and seed with backprop; one row per init.

    Returns rows with the columns ``INIT_COLUMNS``.
    """
    networks = [
        build_network(architecture, activation, init, dataset.input_shape, settings)
        for init in inits
    ]
    loss = losses.softmax_cross_entropy
    rule = rules.backprop(networks[0], loss)
    optimizer = optax.sgd(settings.learning_rate, momentum=settings.momentum)
    state = _initial_states(networks, rule, optimizer, settings.seeds)

    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    gradient_batch = (x_train[: settings.gradient_batch], y_train[: settings.gradient_batch])
    norms = make_gradient_norms(networks[0], loss)(state.params, gradient_batch)
    first, last = first_and_last({k: np.asarray(v) for k, v in norms.items()})

    step = train.make_seeds_step(rule, optimizer)
    for epoch in range(settings.epochs):
        state, _ = train.run_epoch(step, state, x_train, y_train, epoch, settings.batch_size)
    evaluate = train.make_evaluate(rule, loss)
    accuracy, _ = evaluate(state, jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))

    outcome = {
        "test_accuracy": 100.0 * np.asarray(accuracy),
        "grad_norm_first": first,
        "grad_norm_last": last,
        "diverged": np.asarray(state.diverged),
    }
    rows = []
    for index, init in enumerate(inits):
        members = np.arange(index * settings.seeds, (index + 1) * settings.seeds)
        row = {"network": architecture, "activation": activation, "init": init}
        row.update(_init_row(outcome, state.params, members))
        rows.append(row)
    return rows


def _init_row(outcome: dict[str, np.ndarray], params, members: np.ndarray) -> dict:
    """Compute one init's measured columns from its seeds, ``members`` of the stack."""
    first = float(np.mean(outcome["grad_norm_first"][members]))
    last = float(np.mean(outcome["grad_norm_last"][members]))
    hidden = [linear_layers(_member(params, int(m)))[:-1] for m in members]
    return {
        "test_accuracy": float(np.mean(outcome["test_accuracy"][members])),
        "grad_norm_first": first,
        "grad_norm_last": last,
        "grad_ratio": _ratio(first, last),
        "unit_spread": max(unit_spread(layer) for layers in hidden for layer in layers),
        "distinct_units": tuple(count_distinct_units(layer) for layer in hidden[0]),
        "diverged": int(np.sum(outcome["diverged"][members])),
    }


def init_study(
    architectures: Sequence[str] = ARCHITECTURES,
    activations: Sequence[str] = ACTIVATIONS,
    inits: Sequence[str] = tuple(INITS),
    settings: InitStudySettings | None = None,
    dataset: data.Dataset | None = None,
) -> list[dict]:
    """Train every (architecture, activation, init) with backprop and SGD; one row each.

    Args:
        architectures: ``"mlp"`` and/or ``"cnn"`` (see ``build_network``).
        activations: names from ``ACTIVATIONS``.
        inits: keys of ``INITS``.
        settings: networks and training; defaults to ``InitStudySettings()``.
        dataset: defaults to scikit-learn's 8x8 digits.

    Returns:
        Rows with the columns ``INIT_COLUMNS``, architecture-major, then activation, then
        init, in the order given.
    """
    settings = settings or InitStudySettings()
    dataset = dataset if dataset is not None else data.load_digits()
    rows = []
    for architecture in architectures:
        for activation in activations:
            rows += train_initialisations(architecture, activation, inits, dataset, settings)
    return rows


def _scientific(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    return "0" if value == 0.0 else f"{value:.2e}"


def init_table(rows: Sequence[dict]) -> str:
    """Render the ``init_study`` rows as a Markdown table."""
    headers = (
        "network",
        "activation",
        "init",
        "test accuracy (%)",
        "grad norm first layer",
        "grad norm last layer",
        "first / last",
        "unit spread",
        "distinct hidden units per layer",
        "diverged seeds",
    )
    cells = [
        [
            row["network"],
            row["activation"],
            row["init"],
            f"{row['test_accuracy']:.1f}",
            _scientific(row["grad_norm_first"]),
            _scientific(row["grad_norm_last"]),
            _scientific(row["grad_ratio"]),
            _scientific(row["unit_spread"]),
            ", ".join(str(n) for n in row["distinct_units"]),
            str(row["diverged"]),
        ]
        for row in rows
    ]
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


# --- Depth study --------------------------------------------------------------------------


def depth_study(
    depths: Sequence[int] = tuple(range(2, 21, 2)),
    activations: Sequence[str] = ACTIVATIONS,
    inits: Sequence[str] = ("standard", "normal(0.01)", "normal(1.0)"),
    width: int = 64,
    seeds: int = 5,
    batch_size: int = 256,
    dataset: data.Dataset | None = None,
) -> list[dict]:
    """First- and last-layer gradient norms at initialisation of MLPs of each depth.

    The MLP has ``depth`` dense layers: ``depth - 1`` hidden layers of ``width`` units and
    the output layer, biases zero, softmax cross-entropy on the first ``batch_size``
    training digits. Norms are means over ``seeds`` initialisations.

    Args:
        depths: numbers of dense layers, each at least 1.
        activations: names from ``ACTIVATIONS``.
        inits: keys of ``INITS``, or ``"standard"`` for ``STANDARD_INIT[activation]``.

    Returns:
        Rows with the columns ``DEPTH_COLUMNS``; ``init`` is the key actually used.
    """
    for depth in depths:
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"each depth must be a positive integer, got {depth!r}")
    dataset = dataset if dataset is not None else data.load_digits()
    batch = (
        jnp.asarray(dataset.x_train[:batch_size]),
        jnp.asarray(dataset.y_train[:batch_size]),
    )
    keys = jax.random.split(jax.random.key(0), seeds)

    rows = []
    for activation in activations:
        for init_name in inits:
            init = STANDARD_INIT[activation] if init_name == "standard" else init_name
            for depth in depths:
                settings = InitStudySettings(mlp_depth=depth, mlp_width=width)
                network = build_network("mlp", activation, init, dataset.input_shape, settings)
                first, last = first_and_last(_gradient_norms_at_init(network, keys, batch))
                rows.append(
                    {
                        "activation": activation,
                        "init": init,
                        "depth": depth,
                        "grad_norm_first": float(np.mean(first)),
                        "grad_norm_last": float(np.mean(last)),
                    }
                )
    return rows


def _depth_curves(rows) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """``{(activation, init): [(depth, first, last), ...]}`` in depth order."""
    curves: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for row in rows:
        key = (row["activation"], row["init"])
        curves.setdefault(key, []).append(
            (row["depth"], row["grad_norm_first"], row["grad_norm_last"])
        )
    return {key: sorted(points) for key, points in curves.items()}


def depth_table(rows: Sequence[dict]) -> str:
    """First-layer gradient norm per depth (columns), one line per (activation, init).

    The last column is the first-over-last ratio at the largest depth.
    """
    curves = _depth_curves(rows)
    depths = sorted({row["depth"] for row in rows})
    headers = ["activation", "init", *(f"L={d}" for d in depths), f"first / last at L={depths[-1]}"]
    cells = []
    for (activation, init), points in curves.items():
        by_depth = {depth: first for depth, first, _ in points}
        _, first, last = points[-1]
        cells.append(
            [
                activation,
                init,
                *(_scientific(by_depth[d]) if d in by_depth else "" for d in depths),
                _scientific(_ratio(first, last)),
            ]
        )
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def plot_depth_study(rows: Sequence[dict], path: str | Path) -> None:
    """Plot the first-layer gradient norm against depth, log scale, one panel per init kind.

    Panels group the curves by the init of the ``"standard"`` choice (Xavier / He) versus
    each fixed init, so that each activation appears once per panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _depth_curves(rows)
    panels: dict[str, list[tuple[str, str]]] = {}
    for activation, init in curves:
        panel = "standard (Xavier / He)" if STANDARD_INIT[activation] == init else init
        panels.setdefault(panel, []).append((activation, init))

    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True
    )
    for ax, (panel, keys) in zip(axes[0], panels.items()):
        for activation, init in keys:
            points = curves[(activation, init)]
            depths = [d for d, first, _ in points if first > 0]
            values = [first for _, first, _ in points if first > 0]
            label = f"{activation} ({init})" if panel.startswith("standard") else activation
            ax.plot(depths, values, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xticks(sorted({row["depth"] for row in rows}))
        ax.set_title(f"init: {panel}")
        ax.set_xlabel("dense layers")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("first-layer gradient norm at init")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- Result files -------------------------------------------------------------------------


def _environment_lines() -> list[str]:
    from bpalt import reporting

    return [f"- {key}: {value}" for key, value in reporting.environment().items()]


INIT_NOTES = """\
Notes:

- Optimizer: SGD with momentum, not Adam. Adam divides each parameter's step by a running
  root mean square of its own gradient. A layer whose gradient is a million times too small
  then still moves at the full learning rate, and a huge gradient is cut down to the same
  step size, so Adam would hide the vanishing and exploding gradients this table is about.
- Gradient norms are those of the backprop gradient at initialisation on the first
  {gradient_batch} training digits, per layer (weights and bias together), mean over
  seeds. "first" is the first dense or convolution layer, "last" the output layer.
- Unit spread: after training, the maximum over hidden layers and units of the distance
  between a unit's incoming weights (with bias) and the mean unit of its layer (max over
  seeds). Distinct hidden units: units of each hidden layer that differ by more than 1e-4
  times the layer's largest entry, first seed.
- Zero initialisation, MLP: every weight starts at zero, the output layer's too, so all
  units of a hidden layer compute the same value and receive the same gradient. They stay
  identical: 1 distinct unit per layer. With tanh and ReLU the hidden activations are 0
  (tanh(0) = relu(0) = 0), so every weight gradient is exactly 0. The output weights stay
  0, no error reaches the hidden layers, and only the output bias learns: the network
  predicts one class for every input. With sigmoid the hidden activations are 0.5 and the
  weights do move, but in lockstep, so each layer acts as a single unit.
- Zero initialisation, CNN: the output layer keeps its random LeCun initialisation, so each
  channel of the second convolution receives a different error. With sigmoid (activation
  0.5 at zero input) the second convolution's channels separate, while the first
  convolution's channels receive identical errors through the identical second kernels and
  stay one channel. With tanh the convolutions output 0, so the second kernels get no
  gradient and only that layer's biases separate; the first convolution never gets a
  gradient. With ReLU, relu'(0) = 0 stops every gradient below the output layer and both
  convolutions stay zero.
- Biases start at zero everywhere. A first / last ratio of 0 means the first layer had no
  gradient at initialisation, n/a that neither layer had one.
- A diverged seed keeps the parameters of its last finite step, and its accuracy and unit
  counts are those of that state. With weights that large, the relative tolerance merges
  units whose initial differences are small next to the largest weight.
"""


def write_init_study(out: str | Path, command: str, settings: InitStudySettings, rows) -> Path:
    """Write ``init_study.md``: the table, its settings, notes, command and environment."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "init_study.md"
    lines = [
        "# Initialisation study",
        "",
        f"Backprop on scikit-learn's 8x8 digits (1,437 train, 360 test images). MLP: "
        f"{settings.mlp_depth} dense layers ({settings.mlp_depth - 1} hidden of "
        f"{settings.mlp_width} units, then the output layer); CNN: the default "
        f"`digits_cnn` with {', '.join(map(str, settings.cnn_channels))} channels. SGD with "
        f"momentum {settings.momentum}, learning rate {settings.learning_rate}, batch "
        f"{settings.batch_size}, {settings.epochs} epochs, {settings.seeds} seeds "
        f"(0 .. {settings.seeds - 1}); accuracy is the mean over seeds.",
        "",
        init_table(rows),
        "",
        INIT_NOTES.format(gradient_batch=settings.gradient_batch),
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Environment:",
        "",
        *_environment_lines(),
        "",
    ]
    path.write_text("\n".join(lines))
    return path


DEPTH_NOTES = """\
Notes:

- Each network has L dense layers: L - 1 hidden layers of {width} units with the named
  activation and the output layer, biases zero, softmax cross-entropy on the first
  {batch_size} training digits. The value is the norm of the first layer's backprop
  gradient (weights and bias) at initialisation, mean over {seeds} initialisations.
- "standard" is Xavier normal for sigmoid and tanh and He normal for ReLU, the pairing
  each was derived for; normal(s) draws every weight from N(0, s^2).
- Gradients vanish when each layer shrinks the backward signal. Sigmoid's derivative is at
  most 1/4, and weights with std 0.01 scale the signal by about 0.01 * sqrt(width) per
  layer (0.08 for 64 units; ReLU, which zeroes about half the units, gives 0.06). They
  explode when each layer grows it: with std 1.0 and ReLU the gain is about
  sqrt(width / 2), 5.7 for 64 units. With std 1.0, tanh grows too, more slowly because
  its units saturate, while sigmoid's derivative of at most 1/4 and its saturation keep the
  first-layer norm level. The last column compares the first layer with the output layer
  at the largest depth.
"""


def write_depth_study(out: str | Path, command: str, rows, settings: dict) -> Path:
    """Write ``depth_study.md`` and ``depth_study.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_depth_study(rows, out / "depth_study.png")
    path = out / "depth_study.md"
    lines = [
        "# Gradient norm against depth",
        "",
        "First-layer gradient norm at initialisation, MLP on 8x8 digits "
        "(plot: `depth_study.png`, log scale).",
        "",
        depth_table(rows),
        "",
        DEPTH_NOTES.format(**settings),
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Environment:",
        "",
        *_environment_lines(),
        "",
    ]
    path.write_text("\n".join(lines))
    return path


# --- Command line -------------------------------------------------------------------------

RESULT_FILES = {
    "init": ("init_study.md",),
    "depth": ("depth_study.md", "depth_study.png"),
}
"""The files each study writes into its ``--out`` folder."""

def check_output_folder(out: Path, names: Sequence[str]) -> None:
    """Raise ``ValueError`` if the files ``names`` cannot be written into the folder ``out``.

    Rejects an ``out`` that is an existing file, one that lies inside a file, one where no
    file can be created (``checkpoint.check_writable``), and a folder where one of ``names``
    is a folder. The messages name ``--out`` and the path in the way.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; name a folder")
    checkpoint.check_writable(out)
    for name in names:
        if (out / name).is_dir():
            raise ValueError(
                f"--out {out} contains a folder named {name}, where the study writes a "
                "file; remove it or name another folder"
            )


def prepare_output_folder(out: Path, names: Sequence[str]) -> str | None:
    """Check ``out`` with ``check_output_folder`` and create it.

    Returns None when ``out`` is ready, else a one-line error message. The command calls it
    before a study, so that a bad ``--out`` stops it before the training, not after.
    """
    try:
        check_output_folder(out, names)
        out.mkdir(parents=True, exist_ok=True)
    except ValueError as error:
        return str(error)
    except OSError as error:
        return f"cannot create --out {out}: {error.strerror}"
    return None


def build_parser(prog: str = "python -m bpalt.studies") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="study", required=True)

    init = commands.add_parser("init", help="initialisation study: writes init_study.md")
    init.add_argument("--out", default="experiments/results", help="output folder")
    defaults = InitStudySettings()
    init.add_argument(
        "--epochs", type=positive_int, default=defaults.epochs, help="epochs per run"
    )
    init.add_argument("--seeds", type=positive_int, default=defaults.seeds, help="runs per row")
    init.add_argument(
        "--learning-rate",
        type=positive_float,
        default=defaults.learning_rate,
        help="SGD step size",
    )

    depth = commands.add_parser(
        "depth", help="gradient norm against depth: writes depth_study.md and depth_study.png"
    )
    depth.add_argument("--out", default="experiments/results", help="output folder")
    depth.add_argument(
        "--max-depth",
        type=positive_int,
        default=20,
        help="largest number of dense layers; depths run 2, 4, ... up to it (at least 2)",
    )
    depth.add_argument("--seeds", type=positive_int, default=5, help="initialisations per point")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m bpalt.studies") -> int:
    """Run one study from the command line and write its result files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    command = " ".join([prog, *(shlex.quote(a) for a in argv)])
    if args.study == "depth" and args.max_depth < 2:
        build_parser(prog).error(f"--max-depth must be at least 2, got {args.max_depth}")
    problem = prepare_output_folder(Path(args.out), RESULT_FILES[args.study])
    if problem:
        print(f"{prog} {args.study}: error: {problem}", file=sys.stderr)
        return USAGE_ERROR

    if args.study == "init":
        settings = InitStudySettings(
            epochs=args.epochs, seeds=args.seeds, learning_rate=args.learning_rate
        )
        rows = init_study(settings=settings)
        path = write_init_study(args.out, command, settings, rows)
    else:
        depth_settings = {"width": 64, "seeds": args.seeds, "batch_size": 256}
        rows = depth_study(depths=tuple(range(2, args.max_depth + 1, 2)), **depth_settings)
        path = write_depth_study(args.out, command, rows, depth_settings)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
