"""Tables and plots rendered from ``results.jsonl``, never from live training state.

``render(out)`` writes ``summary.md`` (the table, the command, package versions, machine),
``summary.tex`` (the same table in LaTeX), ``curves.png`` (test accuracy per epoch, mean
over seeds with a band of one standard deviation) and ``alignment.png`` (the cosine to the
backprop gradient per block over training, one panel per rule).

A spread over seeds is the standard deviation of two or more values. A single value has
no spread: its standard deviation is NaN, and the tables show the value without "±".
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

PACKAGES = ("bpalt", "jax", "jaxlib", "optax", "flax", "numpy", "scikit-learn")
COLUMNS = (
    "rule",
    "test accuracy (%)",
    "final train loss",
    "s / epoch",
    "ms / step",
    "cosine to backprop",
    "runs",
)
ALIGN = ("left", "right", "right", "right", "right", "right", "left")
"""Alignment of ``COLUMNS``. The cells are already formatted, so tabulate does not parse them
as numbers, which would drop their trailing zeros ("0.030" to "0.03")."""


def _read(path: Path) -> list[dict[str, Any]]:
    from bpalt.experiments import read_results

    return read_results(path)


def _final_records(records) -> dict[str, dict[int, dict]]:
    """Return the last record of every (rule, seed)."""
    final: dict[str, dict[int, dict]] = defaultdict(dict)
    for record in records:
        previous = final[record["rule"]].get(record["seed"])
        if previous is None or record["epoch"] >= previous["epoch"]:
            final[record["rule"]][record["seed"]] = record
    return final


def _mean_cosine(records) -> float:
    """Mean of the ``update_cosine/*`` values logged for a rule, over blocks, seeds and steps.

    A record with a null cosine (a value that was not finite, as in a run that diverged) is
    left out whole. Otherwise the blocks that stayed finite would stand in for those that
    did not: feedback alignment's read-out alone always has a cosine of 1.
    """
    cosines = [
        [v for k, v in r.items() if k.startswith("update_cosine/")] for r in records
    ]
    values = [v for record in cosines if None not in record for v in record]
    return float(np.mean(values)) if values else math.nan


def split_records(records):
    """``(epoch_records, diagnostics_records)``."""
    epochs = [r for r in records if r.get("record", "epoch") == "epoch"]
    diagnosed = [r for r in records if r.get("record") == "diagnostics"]
    return epochs, diagnosed


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summarise the records as one row per rule, in the order the rules first appear."""
    records, diagnosed = split_records(records)
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_rule[record["rule"]].append(record)
    final = _final_records(records)

    rows = []
    for rule, rule_records in by_rule.items():
        ends = list(final[rule].values())
        ok = [r for r in ends if r["status"] == "finished"]
        # Diverged and failed seeds are left out, because their diagnostics describe a broken run.
        stopped = {r["seed"] for r in ends if r["status"] in ("diverged", "failed")}
        accuracies = [100 * r["test_accuracy"] for r in ok]
        epochs = [r for r in rule_records if r["epoch"] >= 1 and "epoch_seconds" in r]
        timing = epochs or [r for r in rule_records if "epoch_seconds" in r]
        statuses = defaultdict(int)
        for r in ends:
            statuses[r["status"]] += 1
        rows.append(
            {
                "rule": rule,
                "accuracy_mean": float(np.mean(accuracies)) if accuracies else math.nan,
                "accuracy_std": _std_or_nan(accuracies),
                "train_loss": _mean_or_nan([r.get("train_loss") for r in ok]),
                "epoch_seconds": _median_or_nan([r["epoch_seconds"] for r in timing]),
                "ms_per_step": _median_or_nan([r["ms_per_step"] for r in timing]),
                "cosine": _mean_cosine(
                    [r for r in diagnosed if r["rule"] == rule and r["seed"] not in stopped]
                ),
                "statuses": dict(statuses),
                "diverged_epochs": sorted(r["epoch"] for r in ends if r["status"] == "diverged"),
                "errors": sorted({r["error"] for r in ends if r.get("error")}),
                "epochs": max((r["epoch"] for r in ends), default=-1) + 1,
                "held_out": _held_out_summary(rule_records, ok),
                "timed_with_compilation": bool(timing) and not epochs,
                "seeds": len({r["seed"] for r in rule_records}),
                "seed_loop": _recorded_loop(rule_records),
            }
        )
    return rows


def _recorded_loop(rule_records) -> str | None:
    """Return the seed loop that every epoch of a rule ran under, or ``None`` when the
    records name no single loop (written before runs recorded it, or a mix)."""
    loops = {r.get("seed_loop") for r in rule_records}
    return loops.pop() if len(loops) == 1 else None


def _seed_loop_lines(rows) -> list[str]:
    """Return the lines naming the rules whose seeds ran batched (``vmap``), those whose
    seeds ran one after another, and those with no single recorded loop.

    The list is empty for a single seed, and when no rule recorded its loop.
    """
    if max((row.get("seeds", 0) for row in rows), default=0) < 2:
        return []
    groups = {
        "vmap": "Seeds batched under `vmap`",
        "map": "Seeds one after another under `lax.map`",
        None: "No single seed loop recorded for every epoch",
    }
    named = {loop: [row["rule"] for row in rows if row.get("seed_loop") == loop] for loop in groups}
    if not named["vmap"] and not named["map"]:
        return []
    sentences = [f"{groups[loop]}: {', '.join(names)}." for loop, names in named.items() if names]
    return [" ".join(sentences), ""]


def _held_out_summary(rule_records, finished) -> dict[str, dict[str, float]]:
    """Summarise each held-out measure over finished seeds: mean and std at initialisation
    and at the end.

    Every measure the rule recorded is listed, with NaN values when no seed finished.
    """
    seeds = {r["seed"] for r in finished}
    initial = {
        r["seed"]: r for r in rule_records if r["epoch"] == 0 and r["seed"] in seeds
    }
    names = sorted(
        {k.split("/", 1)[1] for r in rule_records for k in r if k.startswith("held_out/")}
    )
    summary = {}
    for name in names:
        final = [r.get(f"held_out/{name}") for r in finished]
        start = [r.get(f"held_out_init/{name}") for r in initial.values()]
        final = [v for v in final if v is not None]
        start = [v for v in start if v is not None]
        summary[name] = {
            "init_mean": float(np.mean(start)) if start else math.nan,
            "init_std": _std_or_nan(start),
            "final_mean": float(np.mean(final)) if final else math.nan,
            "final_std": _std_or_nan(final),
        }
    return summary


HELD_OUT_COLUMNS = ("rule", "measure", "at initialisation", "after training", "change (%)")
HELD_OUT_ALIGN = ("left", "left", "right", "right", "right")
"""Alignment of ``HELD_OUT_COLUMNS``, whose cells are formatted like those of ``COLUMNS``."""
NO_HELD_OUT = (
    "Held-out measures: none, because no rule in this run recorded one "
    "(each rule registers its own, if any)."
)


def held_out_rows(rows) -> list[list[str]]:
    """Format the held-out measures table: one line per rule and measure."""
    cells = []
    for row in rows:
        for name, values in row.get("held_out", {}).items():
            start, end = values["init_mean"], values["final_mean"]
            change = 100.0 * (end - start) / abs(start) if start else math.nan
            cells.append(
                [
                    row["rule"],
                    name,
                    _mean_std(start, values["init_std"]),
                    _mean_std(end, values["final_std"]),
                    _format(change, 1),
                ]
            )
    return cells


def _mean_std(mean: float, std: float, digits: int = 4) -> str:
    """Format ``mean ± std``, or the mean alone when ``std`` is NaN, or "n/a" for a NaN mean."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _std_or_nan(values) -> float:
    """Return the population standard deviation of ``values``, or NaN for fewer than two."""
    return float(np.std(values)) if len(values) >= 2 else math.nan


def _mean_or_nan(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else math.nan


def _median_or_nan(values) -> float:
    return float(np.median(values)) if values else math.nan


def _format(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _runs_cell(row) -> str:
    parts = [f"{n} {status}" for status, n in sorted(row["statuses"].items())]
    if row["diverged_epochs"]:
        parts.append(f"diverged at epoch {', '.join(map(str, row['diverged_epochs']))}")
    return "; ".join(parts)


def table_rows(rows) -> list[list[str]]:
    """Format the summary rows as table cells."""
    cells = []
    for row in rows:
        accuracy = _mean_std(row["accuracy_mean"], row["accuracy_std"], 2)
        cells.append(
            [
                row["rule"],
                accuracy,
                _format(row["train_loss"], 4),
                _format(row["epoch_seconds"], 3),
                _format(row["ms_per_step"], 2),
                _format(row["cosine"], 3),
                _runs_cell(row),
            ]
        )
    return cells


def markdown_table(rows) -> str:
    """Render the summary rows as a GitHub Markdown table."""
    return tabulate(
        table_rows(rows), headers=COLUMNS, tablefmt="github", disable_numparse=True,
        colalign=ALIGN,
    )


def latex_table(rows) -> str:
    """Render the summary rows as a LaTeX tabular, with ``$\\pm$`` for "±"."""
    cells = [[c.replace("±", "$\\pm$") for c in row] for row in table_rows(rows)]
    return tabulate(
        cells, headers=COLUMNS, tablefmt="latex_raw", disable_numparse=True, colalign=ALIGN
    )


def environment(packages=PACKAGES) -> dict[str, str]:
    """Describe the machine and the installed version of each of ``packages``.

    Returns ``{"machine": description, package: version, ...}``, with "not installed" as
    the version of a missing package. The comparison summaries, the studies and the
    benchmark all describe their machine with it.
    """
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import jax

    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or 'unknown processor'}, Python "
        f"{platform.python_version()}, JAX devices: {len(jax.devices())} x {devices}"
    )
    return {"machine": machine, **versions}


def summary_markdown(rows, comparison: dict | None, command: str) -> str:
    env = environment()
    lines = ["# Comparison", ""]
    if comparison:
        lines += [
            f"Dataset `{comparison.get('dataset')}`, model `{comparison.get('model')}`, "
            f"seeds {comparison.get('seeds')}. Accuracy is the mean ± standard deviation over "
            "seeds of the final test accuracy (the value alone when one seed finished); "
            "seconds per epoch and milliseconds per step are medians over epochs after the "
            "first (which includes compilation), for all seeds together in one compiled "
            "step; the cosine is the mean of `update_cosine` over blocks, seeds and logged "
            "steps.",
            "",
        ]
    lines += [markdown_table(rows), ""]
    lines += _seed_loop_lines(rows)
    first_epoch_only = [row["rule"] for row in rows if row.get("timed_with_compilation")]
    if first_epoch_only:
        lines += [
            f"The times of {', '.join(first_epoch_only)} come from the first epoch alone, "
            "so they include compilation.",
            "",
        ]
    held_out = held_out_rows(rows)
    if held_out:
        lines += [
            "Held-out measures (mean ± std over finished seeds, the value alone for one "
            "seed, on up to the first 2048 test examples; each rule registers its own):",
            "",
            tabulate(
                held_out,
                headers=HELD_OUT_COLUMNS,
                tablefmt="github",
                disable_numparse=True,
                colalign=HELD_OUT_ALIGN,
            ),
            "",
        ]
    else:
        lines += [NO_HELD_OUT, ""]
    errors = [(row["rule"], e) for row in rows for e in row["errors"]]
    if errors:
        lines += ["Failed rules:", ""] + [f"- `{rule}`: {error}" for rule, error in errors]
        lines.append("")
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["Environment:", ""] + [f"- {k}: {v}" for k, v in env.items()]
    if comparison:
        lines += ["", "Resolved config:", "", "```json", json.dumps(comparison, indent=2), "```"]
    return "\n".join(lines) + "\n"


EPOCH_AXIS_LABEL = "epochs trained"
"""x-axis label of ``curves.png``. The record of epoch ``e`` (numbered from 0 in
``results.jsonl``) contains the test accuracy after ``e + 1`` epochs of training."""


def _curves(records):
    """``{rule: (epochs_trained, mean, std)}`` of test accuracy over seeds.

    ``epochs_trained`` is the records' ``epoch`` number plus one.
    """
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in split_records(records)[0]:
        if r["epoch"] >= 0 and "test_accuracy" in r:
            grouped[r["rule"]][r["epoch"]].append(100 * r["test_accuracy"])
    curves = {}
    for rule, by_epoch in grouped.items():
        epochs = sorted(by_epoch)
        values = [by_epoch[e] for e in epochs]
        curves[rule] = (
            np.array(epochs) + 1,
            np.array([np.mean(v) for v in values]),
            np.array([np.std(v) for v in values]),
        )
    return curves


def draw_curves(ax, records) -> None:
    """Draw each rule's test accuracy per epoch on ``ax``: the seed mean and a band of one
    standard deviation, against whole numbers of epochs trained."""
    from matplotlib.ticker import MaxNLocator

    curves = _curves(records)
    for rule, (epochs, mean, std) in curves.items():
        # A single epoch is a point, which a line alone would not show.
        ax.plot(epochs, mean, label=rule, marker="o" if len(epochs) == 1 else None)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if curves and max(epochs[-1] for epochs, _, _ in curves.values()) == 1:
        ax.set_xlim(0.5, 1.5)
        ax.set_xticks([1])
    ax.set_xlabel(EPOCH_AXIS_LABEL)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_curves(records, path: Path) -> None:
    """Write ``draw_curves``'s figure to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw_curves(ax, records)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alignment(records, path: Path) -> bool:
    """Plot ``update_cosine/<block>`` over steps per rule; False if nothing was logged."""
    series: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in split_records(records)[1]:
        for key, value in r.items():
            if key.startswith("update_cosine/") and value is not None:
                series[r["rule"]][key.split("/", 1)[1]][r["step"]].append(value)
    if not series:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(series), figsize=(3.6 * len(series), 3.4), squeeze=False, sharey=True
    )
    for ax, (rule, blocks) in zip(axes[0], series.items()):
        for block, by_step in sorted(blocks.items()):
            steps = sorted(by_step)
            ax.plot(steps, [np.mean(by_step[s]) for s in steps], label=block)
        ax.set_title(rule)
        ax.set_xlabel("step")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cosine to backprop (seed mean)")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _read_config(path: Path) -> dict[str, Any] | None:
    """Return the resolved config in ``path``, or None without one; raise ``ValueError`` if
    it is damaged."""
    if not path.exists():
        return None
    try:
        comparison = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError included
        raise ValueError(f"cannot read {path} ({error}); it is damaged") from None
    if not isinstance(comparison, dict):
        raise ValueError(
            f"{path} does not contain a comparison config (a JSON object); it is damaged"
        )
    return comparison


def render(out: str | Path, command: str = "") -> list[dict[str, Any]]:
    """Write ``summary.md``, ``summary.tex`` and the plots from ``out/results.jsonl``."""
    from bpalt.checkpoint import write_atomic

    out = Path(out)
    results = out / "results.jsonl"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"{out} is a file; pass the folder that `bpalt compare --out` wrote"
        )
    if not results.exists():
        raise FileNotFoundError(f"no results.jsonl in {out}; run `bpalt compare --out {out}` first")
    records = _read(results)
    if not split_records(records)[0]:
        # Rendering would replace the tables of an earlier render with empty ones.
        raise ValueError(
            f"{results} contains no epoch records, so there is nothing to tabulate; run "
            f"`bpalt compare --out {out}` to train"
        )
    comparison = _read_config(out / "config.json")
    if not command and (out / "command.txt").exists():
        command = (out / "command.txt").read_text().strip()

    rows = summarize(records)
    write_atomic(out / "summary.md", summary_markdown(rows, comparison, command))
    write_atomic(out / "summary.tex", latex_table(rows) + "\n")
    plot_curves(records, out / "curves.png")
    plot_alignment(records, out / "alignment.png")
    return rows
