"""Greedy InfoMax (Löwe, O'Connor, Veeling 2019, arXiv:1905.11786)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bpalt import infonce, losses
from bpalt.nn import Network
from bpalt.rules.base import UpdateRule, check_positive
from bpalt.rules.direct_feedback_alignment import block_outputs_with_stopped_inputs
from bpalt.rules.random_features import check_has_hidden_block
from bpalt.rules.registry import register

PAPER_PREDICTION_STEPS = 5
PAPER_SKIP = 1


class GreedyInfoMaxState(NamedTuple):
    """State of Greedy InfoMax.

    Attributes:
        predictors: one array per hidden block ``l``, of shape (K_l, C_l, C_l): the bilinear
            matrices ``W_k`` of that block's InfoNCE loss, with ``K_l`` its number of
            offsets and ``C_l`` its output channels.
        predictor_opt_state: the state of the rule's own Adam optimizer for ``predictors``.
            The predictors are not network params, so the training loop's optimizer never
            updates them. The rule steps them itself inside ``update``.
    """

    predictors: tuple[jax.Array, ...]
    predictor_opt_state: Any


class ModuleGrid(NamedTuple):
    """The InfoNCE settings of one hidden block.

    Attributes:
        prediction_steps: ``K``, the number of row offsets.
        skip: rows skipped before the first target; offsets are ``k + skip``.
        rows: rows of the block's output grid.
        channels: channels of the block's output.
    """

    prediction_steps: int
    skip: int
    rows: int
    channels: int


def _per_block(value, count: int, name: str) -> list:
    """Return one value per hidden block from ``None``, an integer, or a list of ``count``."""
    if value is None or isinstance(value, numbers.Integral):
        return [value] * count
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(
            f"{name} must be an integer or a list of one integer per hidden block ({count}), "
            f"got {value!r}"
        )
    return list(value)


def fit_module_grids(
    network: Network,
    prediction_steps: int | Sequence[int] | None,
    skip: int | Sequence[int] | None,
) -> tuple[ModuleGrid, ...]:
    """Resolve and check ``K`` and ``skip`` for every hidden block's output grid.

    ``None`` picks the authors' ``K = 5`` and ``skip = 1``, shortened to what the block's
    grid holds: ``skip`` drops to 0 on a grid of 2 rows, and ``K`` to ``rows - 1 - skip``.
    Explicit values must fit: the largest offset ``K + skip`` must be below the number of
    rows.

    Raises:
        ValueError: if a hidden block's output is not an image (rows, cols, channels), or
            the offsets do not fit its grid.
    """
    hidden_shapes = network.block_shapes[:-1]
    steps_per_block = _per_block(prediction_steps, len(hidden_shapes), "prediction_steps")
    skips_per_block = _per_block(skip, len(hidden_shapes), "skip")

    grids = []
    for index, (shape, steps, block_skip) in enumerate(
        zip(hidden_shapes, steps_per_block, skips_per_block)
    ):
        if len(shape) != 3 or shape[0] < 2:
            raise ValueError(
                f"gim predicts rows of a feature map, but hidden block {index} outputs shape "
                f"{shape}; every hidden block must output (rows >= 2, cols, channels)"
            )
        rows = shape[0]
        if block_skip is None:
            block_skip = min(PAPER_SKIP, rows - 2)
        if steps is None:
            steps = min(PAPER_PREDICTION_STEPS, rows - 1 - block_skip)
        is_integer = isinstance(block_skip, numbers.Integral) and not isinstance(block_skip, bool)
        if not is_integer or block_skip < 0:
            raise ValueError(f"skip must be a non-negative integer, got {block_skip!r}")
        block_skip = int(block_skip)
        check_positive("prediction_steps", steps, integer=True)
        steps = int(steps)
        if steps + block_skip >= rows:
            raise ValueError(
                f"prediction_steps={steps} with skip={block_skip} needs offsets up to "
                f"{steps + block_skip} rows, but hidden block {index} has a grid of {rows} "
                f"rows; use prediction_steps + skip <= {rows - 1}"
            )
        grids.append(ModuleGrid(steps, block_skip, rows, shape[2]))
    return tuple(grids)


def init_predictors(key: jax.Array, grids: Sequence[ModuleGrid]) -> tuple[jax.Array, ...]:
    """Draw each block's ``W_k`` uniformly from [-1/sqrt(C), 1/sqrt(C)] (C the channels)."""
    predictors = []
    for block_key, grid in zip(jax.random.split(key, len(grids)), grids):
        bound = 1.0 / math.sqrt(grid.channels)
        shape = (grid.prediction_steps, grid.channels, grid.channels)
        predictors.append(jax.random.uniform(block_key, shape, minval=-bound, maxval=bound))
    return tuple(predictors)


def local_losses(network, grids, num_negatives, params, predictors, x, key):
    """Compute every hidden block's InfoNCE loss on its own output.

    Each block's input is stopped, so block ``l``'s loss depends only on block ``l``'s params
    and its ``W_k``.

    Returns:
        A list with one scalar loss per hidden block, and every block's output, the last
        one being the read-out's logits.
    """
    outputs = block_outputs_with_stopped_inputs(network, params, x)
    keys = jax.random.split(key, len(grids))
    values = [
        infonce.infonce(z, weights, grid.skip, block_key, num_negatives)
        for z, weights, grid, block_key in zip(outputs, predictors, grids, keys)
    ]
    return values, outputs


def _check_hyperparameters(network, prediction_steps, skip, num_negatives, learning_rate):
    check_has_hidden_block(network, "gim")
    check_positive("num_negatives", num_negatives, integer=True)
    check_positive("predictor_learning_rate", learning_rate)
    return fit_module_grids(network, prediction_steps, skip)


HELD_OUT_KEY = 0
"""Seed of the negatives drawn by the held-out InfoNCE measure, fixed so that the values at
initialisation and after training are comparable."""


def held_out_infonce(network: Network, loss=losses.softmax_cross_entropy, **hyperparameters):
    """Build ``evaluate(rule_state, params, x, y) -> {"infonce": ..., "infonce/<block>": ...}``.

    This is the registered held-out measure of ``gim``: ``infonce_evaluator`` with the
    negatives of a fixed key, returned as Python floats. ``y`` is unused. The value
    depends on the batch size of ``x``, so compare values measured on the same inputs.
    """
    del loss
    evaluate = jax.jit(infonce_evaluator(network, **hyperparameters))
    key = jax.random.key(HELD_OUT_KEY)

    def held_out(rule_state, params, x, y):
        del y
        return {name: float(value) for name, value in evaluate(rule_state, params, x, key).items()}

    return held_out


@register(
    "gim",
    training={"epochs": 60, "batch_size": 32, "optimizer": "adam", "learning_rate": 1e-3},
    evaluator=held_out_infonce,
)
def greedy_infomax(
    network: Network,
    loss=losses.softmax_cross_entropy,
    *,
    prediction_steps: int | Sequence[int] | None = None,
    skip: int | Sequence[int] | None = None,
    num_negatives: int = 16,
    predictor_learning_rate: float = 1e-3,
) -> UpdateRule:
    """Greedy InfoMax: every hidden block is a module trained by its own InfoNCE loss.

    Hidden block ``l`` minimises the InfoNCE loss of ``bpalt.infonce`` on its output
    feature map: for ``k = 1 .. K`` the vector at grid position ``(r, c)`` scores the one at
    ``(r + k + skip, c)`` against ``N`` negatives drawn from every position and image of the
    batch, through a bilinear ``W_k`` per offset. Every block's input is stopped, so no
    gradient crosses a module boundary, and all modules train at once. The last block is a
    linear read-out trained with ``loss`` on the stopped features of the last hidden block.
    ``grads`` is therefore not the gradient of a classification loss: hidden blocks get
    their InfoNCE gradients and the read-out the gradient of its own loss. The ``W_k`` are
    not network params: the rule updates them itself with Adam at
    ``predictor_learning_rate``, its optimizer state kept in the rule state.

    Args:
        network: at least two blocks; every hidden block must output a feature map
            (rows, cols, channels) with at least 2 rows.
        loss: the read-out's ``loss(logits, labels) -> scalar``.
        prediction_steps: ``K``, an integer for every hidden block or one per block;
            ``None`` fits the authors' 5 to each block's grid (see ``fit_module_grids``).
        skip: rows skipped before the first target, an integer, one per block, or ``None``
            to fit. The authors skip 1 row, the patch that overlaps the context by half.
        num_negatives: ``N``, negatives per context (the authors use 16).
        predictor_learning_rate: the Adam learning rate of the ``W_k``.

    Returns:
        An ``UpdateRule`` with state ``GreedyInfoMaxState``. Metrics: ``loss`` (the
        read-out's) and ``infonce/<block>`` for every hidden block.

    .. note::
        The rule predicts rows of each block's own output grid; it cuts no patches itself.
        On the default CNN and 8 x 8 digits the grids are 4 x 4 and 2 x 2, so the fitted
        settings are ``K = 2, skip = 1`` (offsets 2 and 3) for block 0 and ``K = 1, skip =
        0`` (offset 1) for block 1, whose context and target see overlapping pixels. On
        28 x 28 images the default CNN's block 0 cells see 4 x 4 pixels, too little to
        predict the cells 2 to 6 rows below, and the rule stayed below its random-features
        baseline on reduced MNIST. The authors cut images into half-overlapping patches
        instead: ``models.patch_cnn`` does the same with a strided first convolution
        (8 x 8 patches, stride 4, a 6 x 6 grid on 28 x 28 inputs), on which the rule
        beat the baseline (``experiments/gim_mnist_t10k.toml``).
    """
    grids = _check_hyperparameters(
        network, prediction_steps, skip, num_negatives, predictor_learning_rate
    )
    names = network.block_names[:-1]
    # float(): optax negates the rate, which wraps around in an unsigned NumPy type.
    predictor_optimizer = optax.adam(float(predictor_learning_rate))

    def objective(params, predictors, batch, key):
        x, y = batch
        values, outputs = local_losses(network, grids, num_negatives, params, predictors, x, key)
        readout = loss(outputs[-1], y)
        return sum(values) + readout, (readout, values)

    def init(key, params):
        del params
        predictors = init_predictors(key, grids)
        return GreedyInfoMaxState(predictors, predictor_optimizer.init(predictors))

    def update(state, params, batch, key):
        (_, (readout, values)), (grads, predictor_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True
        )(params, state.predictors, batch, key)

        updates, predictor_opt_state = predictor_optimizer.update(
            predictor_grads, state.predictor_opt_state, state.predictors
        )
        predictors = optax.apply_updates(state.predictors, updates)

        metrics = {f"infonce/{name}": value for name, value in zip(names, values)}
        metrics["loss"] = readout
        return grads, GreedyInfoMaxState(predictors, predictor_opt_state), metrics

    def predict(state, params, x):
        del state
        return network.apply(params, x)

    return UpdateRule(init, update, predict, name="gim")


def infonce_evaluator(
    network: Network,
    *,
    prediction_steps: int | Sequence[int] | None = None,
    skip: int | Sequence[int] | None = None,
    num_negatives: int = 16,
    predictor_learning_rate: float = 1e-3,
):
    """Return ``evaluate(state, params, x, key) -> metrics``: InfoNCE losses on any data.

    Takes the same hyperparameters as ``greedy_infomax`` (so a config's dict can be passed
    to both) and measures, on held-out inputs ``x`` (batch, *input_shape), each hidden
    block's InfoNCE loss with the predictors in ``state`` and negatives drawn from ``x``.
    The metrics are ``infonce/<block>`` per hidden block and ``infonce``, their mean. The
    negatives, and so the value, depend on ``key`` and on the batch size of ``x``.
    """
    grids = _check_hyperparameters(
        network, prediction_steps, skip, num_negatives, predictor_learning_rate
    )
    names = network.block_names[:-1]

    def evaluate(state, params, x, key):
        values, _ = local_losses(network, grids, num_negatives, params, state.predictors, x, key)
        metrics = {f"infonce/{name}": value for name, value in zip(names, values)}
        metrics["infonce"] = jnp.mean(jnp.stack(values))
        return metrics

    return evaluate
