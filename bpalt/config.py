"""Comparison configs: which rules, data, network and training settings, validated up front.

A config comes from defaults, an optional TOML file and command-line options. Each rule's
training settings resolve in this order, first match wins:

1. the rule's own table in the TOML file (``[rule.fa] learning_rate = 1e-3``);
2. a top-level value from the command line, or else from the TOML file;
3. the settings the rule recommends (``bpalt.rules.training_defaults``);
4. the global defaults: 40 epochs, batch 64, Adam, learning rate 3e-3, and the seed loop
   that ``train.make_seeds_step`` picks from the step's shapes (``seed_loop = "auto"``).

A TOML file looks like::

    # Header comment: the published source and the settings it follows.
    rules = ["bp", "fa", "dfa"]
    dataset = "digits"
    seeds = 3
    epochs = 40

    [model]
    name = "digits_cnn"          # or "lenet", "mlp" with its arguments

    [rule.fa]
    feedback_scale = 1.0         # a rule hyperparameter
    learning_rate = 1e-3         # or a training setting for this rule only
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bpalt import data, losses, models, rules, train
from bpalt.rules.base import check_positive

logger = logging.getLogger(__name__)

GLOBAL_TRAINING = {
    "epochs": 40, "batch_size": 64, "optimizer": "adam", "learning_rate": 3e-3,
    "seed_loop": "auto",
}  # fmt: skip
OPTIMIZERS = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "rmsprop": optax.rmsprop,
}
TOP_LEVEL_KEYS = {
    "rules", "dataset", "data_dir", "model", "loss", "seeds", "diagnostics_every",
    *GLOBAL_TRAINING, "rule",
}  # fmt: skip
# Rules whose table in a comparison is read beside this baseline.
BASELINES = {"hsic": "random_features", "gim": "random_features"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The resolved settings of one rule's runs (all seeds of that rule)."""

    rule: str
    hyperparameters: dict[str, Any]
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    seed_loop: str = "auto"

    def make_optimizer(self) -> optax.GradientTransformation:
        return OPTIMIZERS[self.optimizer](self.learning_rate)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A comparison of rules on one network and data set, several seeds per rule."""

    rules: tuple[str, ...] = ()
    dataset: str = "digits"
    data_dir: str | None = None
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "digits_cnn"})
    loss: str = "cross_entropy"
    seeds: tuple[int, ...] = (0, 1, 2)
    diagnostics_every: int = 20
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    rule_settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def runs(self) -> list[RunSpec]:
        """Return one ``RunSpec`` per rule, with every setting resolved."""
        return [self.run(name) for name in self.rules]

    def run(self, name: str) -> RunSpec:
        settings = dict(self.rule_settings.get(name, {}))
        training = {**GLOBAL_TRAINING, **rules.training_defaults(name), **self.training}
        for key in GLOBAL_TRAINING:
            if key in settings:
                training[key] = settings.pop(key)
        return RunSpec(rule=name, hyperparameters=settings, **training)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-able record of the comparison and every resolved run."""
        record = dataclasses.asdict(self)
        record["seeds"] = list(self.seeds)
        record["rules"] = list(self.rules)
        record["runs"] = [dataclasses.asdict(run) for run in self.runs()]
        return json.loads(json.dumps(record, default=str))


MAX_SEEDS = 1000
"""Largest number of seeds per rule in one comparison; every seed's state is in memory at once."""


def seed_list(seeds) -> tuple[int, ...]:
    """Seeds from a count ``N`` (seeds ``0 .. N-1``) or an explicit list of seeds.

    Raises:
        ValueError: unless ``seeds`` is a positive integer or a non-empty list of distinct
            integers below ``2**32`` (JAX's keys keep the low 32 bits only: seed ``2**32``
            would repeat seed 0), with at most ``MAX_SEEDS`` seeds either way.
    """
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        _check_seed_count(seeds)
        check_positive("seed count", seeds, integer=True)
        return tuple(range(int(seeds)))
    valid = (
        isinstance(seeds, (list, tuple))
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)
        and len(set(seeds)) == len(seeds)
    )
    if not valid:
        raise ValueError(
            "seeds must be a positive count (seeds 0 .. N-1) or a non-empty list of distinct "
            f"integers from 0 to 2**32 - 1, got {seeds!r}"
        )
    _check_seed_count(len(seeds))
    return tuple(seeds)


def _check_seed_count(count: int) -> None:
    if count > MAX_SEEDS:
        raise ValueError(
            f"a comparison takes at most {MAX_SEEDS} seeds per rule, got {count}; split a "
            "larger study into several comparisons with explicit seed lists"
        )


def validate_training(settings: dict[str, Any], where: str = "") -> None:
    """Raise ``ValueError`` on a non-positive epoch count, batch size or learning rate, or
    on an unknown optimizer or seed loop."""
    prefix = f"{where}: " if where else ""
    for key in ("epochs", "batch_size"):
        if key in settings:
            check_positive(prefix + key.replace("_", " "), settings[key], integer=True)
    if "learning_rate" in settings:
        check_positive(prefix + "learning rate", settings["learning_rate"])
    optimizer = settings.get("optimizer")
    if "optimizer" in settings and not (isinstance(optimizer, str) and optimizer in OPTIMIZERS):
        raise ValueError(
            f"{prefix}unknown optimizer {settings['optimizer']!r}; "
            f"accepted: {', '.join(OPTIMIZERS)}"
        )
    if "seed_loop" in settings and settings["seed_loop"] not in train.SEED_LOOPS:
        raise ValueError(
            f"{prefix}invalid seed_loop {settings['seed_loop']!r}; "
            f"accepted: {', '.join(train.SEED_LOOPS)}"
        )


def check_data_dir(dataset: str, data_dir) -> None:
    """Raise ``ValueError`` when a data directory is set for the bundled digits.

    ``data.load`` ignores the directory for the digits, so without this check it would be
    recorded in ``config.json`` but never read.
    """
    if data_dir is None or dataset in data.FILE_DATASETS:
        return
    raise ValueError(
        f"--data-dir (data_dir) {str(data_dir)!r} is not used by dataset {dataset!r}, which "
        "is bundled with scikit-learn. --data-dir applies to the data sets read from files: "
        f"{', '.join(data.FILE_DATASETS)}. Remove it, or choose one of those with --dataset"
    )


def build_network(comparison: Comparison, input_shape, num_classes: int):
    """Build the comparison's network for the data set's input shape and class count."""
    model = dict(comparison.model)
    name = model.pop("name", "digits_cnn")
    if name not in models.MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(models.MODELS)}")
    # A config may fix the network's input shape; the data must then match it.
    model.setdefault("input_shape", tuple(input_shape))
    model["input_shape"] = tuple(model["input_shape"])
    model.setdefault("num_classes", num_classes)
    accepted = inspect.signature(models.MODELS[name]).parameters
    unknown = sorted(set(model) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown [model] setting(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"accepted: {', '.join(accepted)}"
        )
    for key, value in model.items():
        # The model functions annotate list-valued settings as ``Sequence[int]``. A string
        # given there would be split into characters.
        if accepted[key].annotation == "Sequence[int]" and not isinstance(value, (list, tuple)):
            raise ValueError(f"[model] {key} must be a list of integers, got {value!r}")
    missing = [
        key for key, parameter in accepted.items()
        if parameter.default is inspect.Parameter.empty and key not in model
    ]
    if missing:
        message = (
            f"model {name!r} needs the [model] setting(s) {', '.join(missing)} in the config "
            f"file (the arguments of bpalt.models.{name})"
        )
        if missing == ["hidden"]:
            message += ", e.g. hidden = [256, 128]"
        raise ValueError(message)

    user_settings = {key: value for key, value in comparison.model.items() if key != "name"}
    if user_settings:
        settings = f"[model] settings {user_settings}"
    else:
        settings = "default [model] settings"
    try:
        network = models.MODELS[name](**model)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"model {name!r} with {settings} does not build for input shape "
            f"{model['input_shape']}: {error}"
        ) from None
    _check_fits_memory(
        network, comparison.runs(), len(comparison.seeds), f"model {name!r} with {settings}"
    )
    return network


CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
"""Files that contain a Linux control group's memory limit (cgroup v2, then v1)."""


def memory_limit() -> tuple[int, str] | None:
    """Return the memory this process may use in bytes, and where that limit comes from.

    The smallest of physical memory, the address-space limit (``ulimit -v``) and the
    control group's limit; ``None`` where none of them can be read.
    """
    limits = []
    try:
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
    except (AttributeError, OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, "address-space limit (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            limits.append((int(text), "control group's memory limit"))
        break
    return min(limits) if limits else None


def _tree_bytes(tree) -> int:
    """Return the summed size in bytes of a pytree of arrays or ``ShapeDtypeStruct``s."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _check_fits_memory(network, runs, seeds: int, described: str) -> None:
    """Raise ``ValueError`` if one of ``runs`` cannot fit in memory with ``seeds`` seeds.

    The estimate is a lower bound per seed. It counts the params, their grads and the
    optimizer's state, plus the largest array of a forward pass. That array counts twice
    at the run's batch size (it and its gradient), or once at ``train.EVALUATION_CHUNK``
    examples, whichever is larger. XLA needs more than this in practice. Sizes come from
    shapes traced without allocating anything, so a width typed with extra zeros fails
    here at once instead of stalling in allocation or failing inside the first step.
    """
    limit = memory_limit()
    if limit is None or not runs:
        return
    memory, source = limit
    shapes = jax.eval_shape(network.init, jax.random.key(0))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))

    @functools.cache
    def largest_activation(batch: int) -> int:
        # Chunks are traced one at a time, but all of them stay alive for the backward pass.
        x = jax.ShapeDtypeStruct((batch, *network.input_shape), jnp.float32)
        return network.chunks_for(batch) * train.largest_array_bytes(network.apply, shapes, x)

    def needed(run) -> int:
        optimizer_state = jax.eval_shape(run.make_optimizer().init, shapes)
        weights = 2 * _tree_bytes(shapes) + _tree_bytes(optimizer_state)
        activations = max(
            2 * largest_activation(run.batch_size), largest_activation(train.EVALUATION_CHUNK)
        )
        return seeds * (weights + activations)

    need, run = max(((needed(run), run) for run in runs), key=lambda pair: pair[0])
    if need > memory:
        raise ValueError(
            f"{described} has {count:,} parameters and a largest activation of "
            f"{largest_activation(run.batch_size) / 2**30:,.2f} GiB at batch "
            f"{run.batch_size}; training {seeds} seed(s) of rule {run.rule!r} with "
            f"{run.optimizer} needs at least {need / 2**30:,.1f} GiB at once, more "
            f"than the {memory / 2**30:,.1f} GiB of this process's {source}. Use smaller "
            "widths, a smaller batch or fewer seeds"
        )


def with_baselines(rule_names) -> tuple[str, ...]:
    """Add each rule's baseline (e.g. random features beside HSIC) when it is registered."""
    names = list(rule_names)
    for name in list(names):
        baseline = BASELINES.get(name)
        if baseline and baseline in rules.names() and baseline not in names:
            names.append(baseline)
    return tuple(names)


def make_comparison(
    file_settings: dict[str, Any], overrides: dict[str, Any], source: str | None = None
) -> Comparison:
    """Merge TOML settings and command-line overrides into a validated ``Comparison``.

    The file's values are checked on their own first, so that a bad one is reported even
    where the command line overrides it, with ``source`` at the start of the message.

    Args:
        file_settings: the parsed TOML file (empty without one).
        overrides: command-line values that were set (``None`` entries are ignored).
        source: where ``file_settings`` came from, such as the TOML file's path.
    """

    def file_error(error):
        return ValueError(f"{source}: {error}" if source else str(error))

    try:
        _check_values(file_settings)
        _check_names(file_settings)
    except ValueError as error:
        raise file_error(error) from None
    merged = {**file_settings, **{k: v for k, v in overrides.items() if v is not None}}
    _check_values(merged)
    _check_names(merged)

    dataset = merged.get("dataset", "digits")
    try:
        check_data_dir(dataset, merged.get("data_dir"))
    except ValueError as error:
        # The folder may come from the file and the data set from the command line, so the
        # file is named only when it set the folder.
        if overrides.get("data_dir") is None:
            raise file_error(error) from None
        raise

    rule_settings = merged.get("rule", {})
    selected = with_baselines(_rule_names(merged.get("rules", list(rules.names()))))
    unused = [name for name in rule_settings if name not in selected]
    if unused:
        # A file may hold tables for every rule while --rules picks a few, so this warns.
        logger.warning(
            "settings of [rule.%s] not used: %s not among this run's rules (%s)",
            "], [rule.".join(unused), "they are" if len(unused) > 1 else "it is",
            ", ".join(selected),
        )
    return Comparison(
        rules=selected,
        dataset=dataset,
        data_dir=None if merged.get("data_dir") is None else str(merged["data_dir"]),
        model=_model_table(merged.get("model", "digits_cnn")),
        loss=merged.get("loss", "cross_entropy"),
        seeds=seed_list(merged.get("seeds", 3)),
        diagnostics_every=merged.get("diagnostics_every", 20),
        training={key: merged[key] for key in GLOBAL_TRAINING if key in merged},
        rule_settings={name: dict(s) for name, s in rule_settings.items()},
    )


def _check_names(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` on an unknown data set or loss name in ``settings``."""
    dataset = settings.get("dataset", "digits")
    if dataset not in data.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; accepted: {', '.join(data.DATASETS)}")
    losses.get(settings.get("loss", "cross_entropy"))


def _check_values(settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` on an unknown key or a value that is bad on its own."""
    unknown = sorted(set(settings) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(TOP_LEVEL_KEYS))}"
        )
    if "rules" in settings:
        _rule_names(settings["rules"])
    if "seeds" in settings:
        seed_list(settings["seeds"])
    validate_training({key: settings[key] for key in GLOBAL_TRAINING if key in settings})
    if "rule" in settings:
        _check_rule_tables(settings["rule"])
    if "diagnostics_every" in settings:
        _check_diagnostics_every(settings["diagnostics_every"])
    if "model" in settings:
        _model_table(settings["model"])
    for key, example in (("dataset", "'digits'"), ("data_dir", "'data/mnist'"),
                         ("loss", "'cross_entropy'")):
        if key in settings and not isinstance(settings[key], (str, os.PathLike)):
            raise ValueError(f"{key} must be text such as {example}, got {settings[key]!r}")


def _rule_names(value) -> tuple[str, ...]:
    """Registered rule names from a list or a comma-separated string, without repeats."""
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if (
        not isinstance(names, (list, tuple))
        or not names
        or any(not isinstance(name, str) or not name for name in names)
    ):
        raise ValueError(
            f"rules must be a non-empty list of rule names, got {value!r}; "
            f"accepted: {', '.join(rules.names())}"
        )
    for name in names:
        rules.constructor(name)
    if len(set(names)) != len(names):
        raise ValueError(f"rules must not repeat, got {list(names)}")
    return tuple(names)


def _check_rule_tables(rule_settings) -> None:
    """Check each ``[rule.NAME]`` table's training keys and hyperparameter names."""
    if not isinstance(rule_settings, dict):
        raise ValueError(f"[rule] must be a table of [rule.<name>] tables, got {rule_settings!r}")
    for name, settings in rule_settings.items():
        rules.constructor(name)
        if not isinstance(settings, dict):
            raise ValueError(f"[rule.{name}] must be a table of settings, got {settings!r}")
        validate_training(settings, where=f"[rule.{name}]")
        hyper = {k: v for k, v in settings.items() if k not in GLOBAL_TRAINING}
        accepted = rules.hyperparameters(name)
        bad = sorted(set(hyper) - set(accepted))
        if bad:
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(bad)} for rule {name!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )


def _check_diagnostics_every(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"diagnostics_every must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"diagnostics_every must be >= 0 (0 turns it off), got {value}")


def _model_table(value) -> dict[str, Any]:
    """Return the ``[model]`` table, from a table or a bare model name."""
    model = {"name": value} if isinstance(value, str) else value
    if not isinstance(model, dict):
        raise ValueError(
            f"model must be a model name or a [model] table, got {value!r}; "
            f"accepted names: {', '.join(models.MODELS)}"
        )
    return dict(model)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found (or not a file): {path}")
    try:
        # Some editors start UTF-8 files with a byte order mark, which TOML does not allow.
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"invalid TOML in {path}: {error}") from None
