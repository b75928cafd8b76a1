"""Run a comparison: config -> runs -> ``results.jsonl`` -> tables and plots.

Output folder:

- ``config.json``: the resolved comparison; a rerun with another config is rejected.
- ``results.jsonl``: JSON lines appended and flushed as each epoch ends. A line with
  ``"record": "epoch"`` exists per rule, seed and epoch (with the rule's held-out measures,
  if it registered any, in ``held_out/<name>``, and their values at initialisation in
  ``held_out_init/<name>`` at epoch 0); its ``status`` is ``running`` until
  the run's last epoch (``finished``), or ``diverged`` at the epoch where its loss became
  non-finite (the run then stops), or ``failed`` with the error when the rule raised. Lines
  with ``"record": "diagnostics"`` hold the diagnostics (``bpalt.diagnostics``) of one seed
  at one ``step``, logged every ``diagnostics_every`` steps and after the first step.
- ``command.txt``: the command that produced the folder, for the rendered summary.
- ``checkpoints/<rule>.msgpack``: the state of all seeds of a rule after its last epoch.
- ``summary.md``, ``summary.tex``, ``curves.png``, ``alignment.png``: rendered from
  ``results.jsonl`` (``bpalt table`` renders them again without training).

Rerunning with the same folder resumes: finished rules are skipped and an unfinished rule
continues from its checkpoint. Step keys and batch orders depend only on the seed, the
epoch and the step, so a resumed run gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bpalt import checkpoint, config, data, diagnostics, losses, reporting, rules, train

logger = logging.getLogger(__name__)
DIAGNOSTIC_BATCH = 256
HELD_OUT_EXAMPLES = 2048
"""Test examples (the first ones) on which a rule's held-out measures are taken."""
TERMINAL = ("finished", "diverged")


class ConfigMismatchError(ValueError):
    """Raised when the output folder contains a comparison with a different config."""


class RuleSettingsError(ValueError):
    """Raised when a rule rejects the hyperparameters of its ``[rule.NAME]`` table."""


def _config_differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                found.append(f"{where} added ({new[key]!r})")
            elif key not in new:
                found.append(f"{where} removed (was {old[key]!r})")
            else:
                found.extend(_config_differences(old[key], new[key], where))
        return found
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _fingerprint(record: dict[str, Any]) -> dict[str, Any]:
    """What must match to resume: data, model, loss, seeds and every run's resolved settings.

    How a setting was given (default, file or command line) and the rules' order do not
    matter.
    """
    kept = {k: v for k, v in record.items() if k not in ("training", "rule_settings", "rules")}
    # Folders written before runs recorded their seed loop used the automatic choice.
    kept["runs"] = {run["rule"]: {"seed_loop": "auto", **run} for run in record.get("runs", [])}
    return kept


def _default_error(rule: str, network, loss: str) -> str | None:
    """Return the message of the ``ValueError`` that registered ``rule`` raises on ``network``
    at its default settings, or None when it builds."""
    try:
        rules.get(rule, network, losses.get(loss))
    except ValueError as error:
        return str(error)
    return None


def prepare_output(out: Path, record: dict[str, Any]) -> None:
    """Create ``out`` with ``config.json``, or check that an existing one matches ``record``.

    Raises:
        ValueError: if ``out`` is a file, lies under a file, or is a folder that contains files
            but no ``config.json``.
        ConfigMismatchError: if ``out`` contains a comparison with other settings.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; name a folder")
    checkpoint.check_writable(out)
    path = out / "config.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"cannot read {path} ({error}); it is damaged: choose another --out"
            ) from None
        if not isinstance(previous, dict):
            raise ValueError(
                f"{path} does not contain a comparison config (a JSON object); it is "
                "damaged: choose another --out"
            )
        runs = previous.get("runs", [])
        if not isinstance(runs, list) or not all(
            isinstance(run, dict) and "rule" in run for run in runs
        ):
            raise ValueError(
                f"{path} has an invalid runs list (expected one object with a rule per run); "
                "it is damaged: choose another --out"
            )
        differences = _config_differences(_fingerprint(previous), _fingerprint(record))
        if differences:
            raise ConfigMismatchError(
                f"{out} contains a comparison with a different config ({'; '.join(differences)}); "
                "choose another --out or the same settings to resume"
            )
        return
    if out.is_dir() and any(out.iterdir()):
        # Its files could share names with the results (summary.md, results.jsonl) and be
        # overwritten.
        raise ValueError(
            f"--out {out} already contains files but no comparison (no config.json); "
            "choose a new or empty folder, or the folder of an earlier run to resume it"
        )
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomic(path, json.dumps(record, indent=2, sort_keys=True))


def read_results(path: Path) -> list[dict[str, Any]]:
    """Read ``results.jsonl``, skipping a line cut short by an interruption.

    A line that is not JSON, or not a record (an object with ``rule``, ``seed`` and
    ``epoch``, and a ``status`` for an epoch record), is skipped with a warning.

    Raises:
        ValueError: if ``path`` is a folder or is not UTF-8 text.
    """
    return [record for _, record in _parsed_lines(path) if record is not None]


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """Return each non-blank line of ``path``, with its line end, and the line's record.

    The record is ``None`` for a line that is not JSON or not a record, and a warning names
    each such line.
    """
    if not path.exists():
        return []
    if path.is_dir():
        raise ValueError(f"{path} is a folder; results.jsonl must be a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"cannot read {path}: byte {error.object[error.start]:#04x} at offset "
            f"{error.start} is not UTF-8 text; the file is damaged, so restore it or choose "
            "another folder"
        ) from None
    parsed = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            _warn_once(path, number, line, "skipping unreadable line %d of %s")
            parsed.append((line, None))
            continue
        if not _is_record(record):
            _warn_once(path, number, line, "skipping line %d of %s: not a result record")
            record = None
        parsed.append((line, record))
    return parsed


_WARNED_LINES: set[tuple[str, int, str]] = set()
"""Lines already warned about: one compare reads results.jsonl several times."""


def _warn_once(path: Path, number: int, line: str, message: str) -> None:
    """Log ``message`` about line ``number`` of ``path`` the first time it is seen."""
    key = (str(path.resolve()), number, line)
    if key not in _WARNED_LINES:
        _WARNED_LINES.add(key)
        logger.warning(message, number, path)


TEXT_FIELDS = ("record", "rule", "status", "error", "seed_loop")
"""Fields of a result record that contain text; every other field is a number or null."""
NULLABLE_TEXT_FIELDS = ("seed_loop",)
"""Text fields that may also be null, for an unknown value."""


def _is_record(record) -> bool:
    """Return whether ``record`` has the fields and types that readers of results rely on."""
    if not isinstance(record, dict):
        return False
    typed = (
        isinstance(record.get("rule"), str)
        and isinstance(record.get("seed"), int)
        and isinstance(record.get("epoch"), int)
        and all(
            isinstance(record.get(key, ""), str)
            or (key in NULLABLE_TEXT_FIELDS and record[key] is None)
            for key in TEXT_FIELDS
        )
        and all(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            for key, value in record.items()
            if key not in TEXT_FIELDS
        )
    )
    if record.get("record", "epoch") == "epoch":
        return typed and "status" in record
    return typed


class ResultsLog:
    """Append-only ``results.jsonl``: one JSON object a line, flushed and synced per write."""

    def __init__(self, path: Path):
        self.path = path

    def keep(self, predicate: Callable[[dict], bool]) -> None:
        """Rewrite the file atomically without the records that fail ``predicate``.

        A line that is not a record, such as one written by another version of bpalt or
        edited by hand, stays as it is, so that no computed result is lost. Only an
        unreadable last line without a line end, cut short by an interruption, is dropped.
        """
        lines = []
        for line, record in _parsed_lines(self.path):
            cut_short = record is None and not line.endswith("\n")
            if cut_short or (record is not None and not predicate(record)):
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
        checkpoint.write_atomic(self.path, "".join(lines))

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.path, "a") as file:
            for record in records:
                file.write(json.dumps(record, allow_nan=True) + "\n")
            file.flush()
            os.fsync(file.fileno())


def _rule_status(records: list[dict], rule: str, seeds) -> str:
    """``done`` if every seed of ``rule`` ended, else ``todo``."""
    ended = {r["seed"] for r in records if r["rule"] == rule and r.get("status") in TERMINAL}
    return "done" if set(seeds) <= ended else "todo"


def _to_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class RuleRunner:
    """Trains all seeds of one rule in one compiled step and reports each epoch."""

    def __init__(self, spec: config.RunSpec, comparison: config.Comparison, network, dataset):
        self.spec = spec
        self.network = network
        self.loss = losses.get(comparison.loss)
        self.seeds = comparison.seeds
        self.rule = rules.get(spec.rule, network, self.loss, **spec.hyperparameters)
        self.optimizer = spec.make_optimizer()
        self.step = train.make_seeds_step(self.rule, self.optimizer, spec.seed_loop)
        self.x_train = jnp.asarray(dataset.x_train)
        self.y_train = jnp.asarray(dataset.y_train)
        self.seed_loop = self.resolve_seed_loop()
        self.evaluate = train.make_evaluate(self.rule, self.loss)
        self.diagnostics_every = comparison.diagnostics_every
        diagnose = diagnostics.make_diagnose(self.rule, network, self.loss)
        self.diagnose = jax.jit(jax.vmap(diagnose, in_axes=(0, 0, None, None)))
        self.x_test = jnp.asarray(dataset.x_test)
        self.y_test = jnp.asarray(dataset.y_test)
        size = min(DIAGNOSTIC_BATCH, dataset.x_train.shape[0])
        self.diagnostic_batch = (self.x_train[:size], self.y_train[:size])
        self.held_out = rules.held_out_evaluator(
            spec.rule, network, self.loss, **spec.hyperparameters
        )
        self.held_out_batch = (
            self.x_test[:HELD_OUT_EXAMPLES], np.asarray(dataset.y_test[:HELD_OUT_EXAMPLES])
        )

    def initial_state(self):
        return train.init_seeds(self.rule, self.network, self.optimizer, self.seeds)

    def resolve_seed_loop(self) -> str:
        """Return the loop, ``"vmap"`` or ``"map"``, that this rule's seeds run under.

        The shapes are traced without computing anything.
        """
        state = jax.eval_shape(self.initial_state)
        indices = jax.ShapeDtypeStruct((len(self.seeds), self.spec.batch_size), jnp.int32)
        return train.seed_loop_for(
            self.rule, self.optimizer, state, self.x_train, self.y_train, indices,
            self.spec.seed_loop,
        )

    def train_epoch(self, state, epoch: int):
        """Train all seeds for one epoch, with diagnostics every ``diagnostics_every`` steps.

        Returns the state, the mean train metrics per seed, the training seconds (the
        diagnostics' time excluded), the step count and the diagnostics records.
        """
        steps = self.x_train.shape[0] // self.spec.batch_size
        every = self.diagnostics_every
        diagnosed, paused = [], 0.0

        def on_step(index, current):
            nonlocal paused
            step = epoch * steps + index + 1
            if every > 0 and (step % every == 0 or step == 1):
                jax.block_until_ready(current)
                pause_start = time.perf_counter()
                diagnosed.append((step, self.diagnose_state(current)))
                paused += time.perf_counter() - pause_start

        start = time.perf_counter()
        state, metrics = train.run_epoch(
            self.step, state, self.x_train, self.y_train, epoch, self.spec.batch_size, on_step
        )
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start - paused
        return state, metrics, seconds, steps, diagnosed

    def held_out_measures(self, state) -> list[dict[str, float]]:
        """Measure the rule's held-out measures per seed (empty dicts if it registered none)."""
        if self.held_out is None:
            return [{} for _ in self.seeds]
        x, y = self.held_out_batch
        measures = []
        for index in range(len(self.seeds)):
            seed_state = jax.tree.map(lambda leaf, index=index: leaf[index], state)
            measures.append(self.held_out(seed_state.rule_state, seed_state.params, x, y))
        return measures

    def diagnose_state(self, state) -> dict[str, np.ndarray]:
        key = jax.random.key(0)
        metrics = self.diagnose(state.rule_state, state.params, self.diagnostic_batch, key)
        return {k: np.asarray(v) for k, v in metrics.items()}

    def diagnostic_records(self, epoch, diagnosed, was_diverged) -> list[dict]:
        """Build one record per seed and logged step, for seeds running at the epoch's start."""
        records = []
        for step, metrics in diagnosed:
            for index, seed in enumerate(self.seeds):
                if was_diverged[index]:
                    continue
                record = {
                    "record": "diagnostics",
                    "rule": self.spec.rule,
                    "seed": int(seed),
                    "epoch": int(epoch),
                    "step": int(step),
                }
                record.update({k: _to_float(v[index]) for k, v in metrics.items()})
                records.append(record)
        return records

    def epoch_records(
        self, state, epoch, metrics, seconds, steps, was_diverged, initial_measures=None
    ):
        """Build one JSON record per seed still running at the start of this epoch.

        Held-out measures go in ``held_out/<name>``; ``initial_measures`` (per seed, taken
        before the first step) go in ``held_out_init/<name>``.
        """
        accuracy, test_loss = self.evaluate(state, self.x_test, self.y_test)
        measures = self.held_out_measures(state)
        diverged = np.asarray(state.diverged)
        final = epoch == self.spec.epochs - 1
        records = []
        for index, seed in enumerate(self.seeds):
            if was_diverged[index]:
                continue
            if diverged[index]:
                status = "diverged"
            elif final:
                status = "finished"
            else:
                status = "running"
            record = {
                "record": "epoch",
                "rule": self.spec.rule,
                "seed": int(seed),
                "epoch": int(epoch),
                "status": status,
                "train_loss": _to_float(metrics["loss"][index]),
                "test_accuracy": float(accuracy[index]),
                "test_loss": _to_float(test_loss[index]),
                "epoch_seconds": seconds,
                "ms_per_step": 1000.0 * seconds / steps,
                "seed_loop": self.seed_loop,
            }
            for name, values in metrics.items():
                if name != "loss":
                    record[f"train/{name}"] = _to_float(values[index])
            for name, value in measures[index].items():
                record[f"held_out/{name}"] = _to_float(value)
            if initial_measures is not None:
                for name, value in initial_measures[index].items():
                    record[f"held_out_init/{name}"] = _to_float(value)
            if status == "diverged":
                record["diverged_step"] = int(np.asarray(state.diverged_step)[index])
            records.append(record)
        return records


def run_rule(
    runner: RuleRunner, out: Path, log: ResultsLog, progress=None, should_stop=None
) -> None:
    """Train one rule's seeds from its checkpoint (if any) to the last epoch.

    ``should_stop``, when given, is called after each epoch's checkpoint; if it returns
    true, training stops there with ``KeyboardInterrupt``, and a rerun resumes from that
    checkpoint.
    """
    spec = runner.spec
    path = out / "checkpoints" / f"{spec.rule}.msgpack"
    state = runner.initial_state()
    first_epoch = 0
    if path.exists():
        try:
            state, metadata = checkpoint.load(path, state)
        except Exception as error:
            raise ValueError(
                f"cannot read checkpoint {path} ({error}); delete it to restart rule "
                f"{spec.rule!r} from epoch 0"
            ) from None
        first_epoch = int(metadata["epoch"]) + 1
        if progress is not None:
            progress.update(first_epoch)

    initial_measures = runner.held_out_measures(state) if first_epoch == 0 else None
    for epoch in range(first_epoch, spec.epochs):
        was_diverged = np.asarray(state.diverged).copy()
        state, metrics, seconds, steps, diagnosed = runner.train_epoch(state, epoch)
        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        records = runner.diagnostic_records(epoch, diagnosed, was_diverged)
        records += runner.epoch_records(
            state, epoch, metrics, seconds, steps, was_diverged,
            initial_measures if epoch == 0 else None,
        )
        log.append(records)
        checkpoint.save(path, state, {"epoch": epoch})
        if should_stop is not None and should_stop():
            raise KeyboardInterrupt
        if progress is not None:
            progress.update(1)
            progress.set_postfix(rule=spec.rule, epoch=epoch, refresh=False)
        if np.all(np.asarray(state.diverged)):
            if progress is not None:
                progress.update(spec.epochs - epoch - 1)
            break


def load_dataset(comparison: config.Comparison) -> data.Dataset:
    """Load the comparison's data set (validated before any compilation)."""
    return data.load(comparison.dataset, comparison.data_dir)


def compare(
    comparison: config.Comparison,
    out: str | Path,
    command: str = "",
    show_progress: bool = True,
    should_stop=None,
) -> list[dict[str, Any]]:
    """Train every rule of ``comparison`` and write the results folder.

    A rule that raises is recorded as ``failed`` and the others still run. ``should_stop``
    (no arguments, returns a bool) is asked after every epoch's checkpoint; when it returns
    true, ``compare`` raises ``KeyboardInterrupt`` and a rerun resumes. Returns the summary
    rows (one per rule).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    dataset = load_dataset(comparison)
    specs = comparison.runs()
    for spec in specs:
        # Checked before the network is built: its memory check reads the batch sizes.
        if spec.batch_size > dataset.x_train.shape[0]:
            raise ValueError(
                f"batch size {spec.batch_size} of rule {spec.rule!r} is larger than the "
                f"training set ({dataset.x_train.shape[0]} examples); choose a smaller one"
            )
    network = config.build_network(comparison, dataset.input_shape, dataset.num_classes)
    data.check_input_shape(dataset, network.input_shape)
    if network.output_shape != (dataset.num_classes,):
        # Labels beyond the logits would be one-hot encoded as zeros, and the loss NaN.
        raise ValueError(
            f"dataset {dataset.name!r} has {dataset.num_classes} classes but the network "
            f"outputs shape {network.output_shape}; remove num_classes from [model] or set "
            f"it to {dataset.num_classes}"
        )
    for spec in specs:
        # Build every rule first, so that a bad hyperparameter is reported before anything
        # trains.
        try:
            rule = rules.get(
                spec.rule, network, losses.get(comparison.loss), **spec.hyperparameters
            )
        except ValueError as error:
            # A baseline runs without being asked for: name the rule that brought it.
            beside = [
                rule for rule, baseline in config.BASELINES.items()
                if baseline == spec.rule and rule in comparison.rules
            ]
            if beside:
                error = f"{error} ({spec.rule} runs as the baseline of {', '.join(beside)})"
            # Hyperparameters come from the config's [rule.NAME] table, so the message names
            # that table. A rule that raises the same error at its default settings rejects
            # the network instead, and the table is not named.
            if spec.hyperparameters and str(error) != _default_error(
                spec.rule, network, comparison.loss
            ):
                raise RuleSettingsError(f"[rule.{spec.rule}]: {error}") from None
            raise ValueError(str(error)) from None
        _check_batch_size(rule, network, spec, dataset)
    prepare_output(out, comparison.to_json())
    if command:
        checkpoint.write_atomic(out / "command.txt", command + "\n")

    log = ResultsLog(out / "results.jsonl")
    records = read_results(log.path)
    pending = [s for s in specs if _rule_status(records, s.rule, comparison.seeds) == "todo"]
    pending_names = {s.rule for s in pending}
    log.keep(lambda r: r["rule"] not in pending_names or r.get("status") != "failed")
    _drop_epochs_after_checkpoints(out, log, pending, comparison.seeds)

    total = sum(s.epochs for s in pending)
    # With every rule finished there is nothing to train, so no bar is drawn.
    hidden = not show_progress or total == 0
    with tqdm(total=total, desc="training", unit="epoch", disable=hidden) as bar:
        for spec in pending:
            try:
                runner = RuleRunner(spec, comparison, network, dataset)
                run_rule(runner, out, log, bar, should_stop)
            except Exception as error:  # one rule's failure must not lose the others
                logger.exception("rule %s failed", spec.rule)
                log.append(
                    [
                        {
                            "record": "epoch",
                            "rule": spec.rule,
                            "seed": int(seed),
                            "epoch": -1,
                            "status": "failed",
                            "error": f"{type(error).__name__}: {error}",
                        }
                        for seed in comparison.seeds
                    ]
                )

    return reporting.render(out, command=command)


def _check_batch_size(rule, network, spec: config.RunSpec, dataset) -> None:
    """Trace one update of ``rule`` at the run's batch size, without computing it.

    A rule that cannot take that batch (HSIC needs two examples) then fails before any rule
    trains, rather than after the others have. Only ``ValueError``, the rules' error for bad
    input, stops the comparison here; any other error is recorded when the rule runs.
    """
    params = jax.eval_shape(network.init, jax.random.key(0))
    state = jax.eval_shape(rule.init, jax.random.key(0), params)
    batch = (
        jax.ShapeDtypeStruct((spec.batch_size, *dataset.input_shape), dataset.x_train.dtype),
        jax.ShapeDtypeStruct((spec.batch_size,), dataset.y_train.dtype),
    )
    try:
        jax.eval_shape(rule.update, state, params, batch, jax.random.key(1))
    except ValueError as error:
        raise ValueError(f"rule {spec.rule!r} at batch size {spec.batch_size}: {error}") from None
    except Exception:  # noqa: BLE001 - recorded as the rule's failure when it runs
        return


def _drop_epochs_after_checkpoints(out: Path, log: ResultsLog, pending, seeds) -> None:
    """Forget records of unfinished rules written after their last checkpoint.

    Records are appended before the checkpoint is saved, so an interruption between the two
    leaves an epoch that the resumed run trains again. Dropping it avoids a duplicate.

    Raises:
        ValueError: if ``results.jsonl`` lacks an epoch that a checkpoint already covers
            (the file was emptied or edited). Resuming would leave those epochs out of
            the tables, so the message names the checkpoint to delete to retrain.
    """
    records = read_results(log.path)
    last_saved = {}
    for spec in pending:
        path = out / "checkpoints" / f"{spec.rule}.msgpack"
        last_saved[spec.rule] = _checkpoint_epoch(path)
        _check_epochs_recorded(records, spec.rule, seeds, last_saved[spec.rule], path)

    log.keep(lambda r: r["rule"] not in last_saved or r["epoch"] <= last_saved[r["rule"]])


def _check_epochs_recorded(records, rule: str, seeds, last_epoch: int, path: Path) -> None:
    """Raise ``ValueError`` unless every seed of ``rule`` has epochs ``0 .. last_epoch``.

    A seed that diverged stops at its ``diverged`` record, so it needs epochs up to that one.
    """
    for seed in seeds:
        epochs = [
            r for r in records
            if r.get("record") == "epoch" and r["rule"] == rule and r["seed"] == seed
        ]
        recorded = {r["epoch"] for r in epochs}
        diverged = [r["epoch"] for r in epochs if r.get("status") == "diverged"]
        needed = min([last_epoch, *diverged])
        missing = sorted(set(range(needed + 1)) - recorded)
        if missing:
            raise ValueError(
                f"results.jsonl in {path.parent.parent} has no record of epoch {missing[0]} "
                f"of rule {rule!r}, seed {seed}, which its checkpoint {path} already covers; "
                "delete that checkpoint to train the rule again from epoch 0"
            )


def _checkpoint_epoch(path: Path) -> int:
    if not path.exists():
        return -1
    from flax import serialization

    try:
        return int(serialization.msgpack_restore(path.read_bytes())["metadata"]["epoch"])
    except Exception as error:
        raise ValueError(
            f"cannot read checkpoint {path} ({error}); delete it to restart that rule"
        ) from None
