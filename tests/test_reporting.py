"""The comparison summary: the held-out measures table or a sentence in its place; the machine.

Also the spread over seeds in the tables, the epoch axis of ``curves.png`` and damaged
results folders.
"""

import json
import os
import platform
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from bpalt import reporting


def _epoch_record(rule, seed, epoch, status="finished", **measures):
    return {
        "record": "epoch",
        "rule": rule,
        "seed": seed,
        "epoch": epoch,
        "status": status,
        "train_loss": 0.1,
        "test_accuracy": 0.9,
        "test_loss": 0.2,
        "epoch_seconds": 1.0,
        "ms_per_step": 2.0,
        **measures,
    }


def _summary(records):
    return reporting.summary_markdown(reporting.summarize(records), None, "")


def _diagnostics_record(rule, seed, step, **cosines):
    return {"record": "diagnostics", "rule": rule, "seed": seed, "epoch": 0, "step": step,
            **{f"update_cosine/{block}": value for block, value in cosines.items()}}


def test_cosine_skips_diverged_and_null():
    # Seed 0 diverged after a finite first step. Seed 1 finished, but one of its records
    # has a null block beside a read-out cosine of 1.
    diverged = [
        _diagnostics_record("fa", 0, 1, block0=0.9, block1=0.9),
        _diagnostics_record("fa", 0, 2, block0=None, block1=1.0),
    ]
    finished = [
        _diagnostics_record("fa", 1, 1, block0=0.2, block1=0.6),
        _diagnostics_record("fa", 1, 2, block0=None, block1=1.0),
    ]
    epochs = [_epoch_record("fa", 0, 0, "diverged"), _epoch_record("fa", 1, 0)]

    (row,) = reporting.summarize([*epochs, *diverged, *finished])
    assert row["cosine"] == pytest.approx(0.4)

    (row,) = reporting.summarize([*epochs[:1], *diverged])
    assert np.isnan(row["cosine"])
    line = next(x for x in _summary([*epochs[:1], *diverged]).splitlines() if "| fa" in x)
    cells = [cell.strip() for cell in line.split("|")]
    assert cells[6] == "n/a"


def test_summary_without_held_out_measures():
    records = [_epoch_record(rule, seed, 0) for rule in ("bp", "hsic") for seed in (0, 1)]

    summary = _summary(records)

    assert (
        "Held-out measures: none, because no rule in this run recorded one "
        "(each rule registers its own, if any)." in summary
    )
    assert "| measure" not in summary


def test_summary_with_held_out_measures_shows_table():
    records = [
        _epoch_record("gim", 0, 0, **{"held_out_init/infonce": 2.0, "held_out/infonce": 1.0}),
        _epoch_record("bp", 0, 0),
    ]

    summary = _summary(records)

    assert "Held-out measures (mean ± std over finished seeds" in summary
    assert "| gim    | infonce   |              2.0000 |           1.0000 |" in summary
    assert "no rule in this run recorded one" not in summary


def test_held_out_listed_when_no_seed_finished():
    records = [
        _epoch_record("gim", 0, 0, status="diverged", **{"held_out/infonce": None}),
        _epoch_record("bp", 0, 0),
    ]

    rows = reporting.summarize(records)

    assert reporting.held_out_rows(rows) == [["gim", "infonce", "n/a", "n/a", "n/a"]]
    assert "no rule in this run recorded one" not in _summary(records)


def test_environment_describes_machine_and_packages():
    described = reporting.environment()

    assert list(described) == ["machine", *reporting.PACKAGES]
    assert f"{os.cpu_count()} CPU cores" in described["machine"]
    assert f"Python {platform.python_version()}" in described["machine"]
    assert "JAX devices: " in described["machine"]


def test_environment_missing_package():
    described = reporting.environment(("bpalt-no-such-package",))

    assert described == {
        "machine": reporting.environment(())["machine"],
        "bpalt-no-such-package": "not installed",
    }


def test_summary_says_when_times_include_compilation():
    one_epoch = [_epoch_record("bp", 0, 0), _epoch_record("fa", 0, 0), _epoch_record("fa", 0, 1)]

    summary = _summary(one_epoch)

    assert "The times of bp come from the first epoch alone, so they include compilation." in (
        summary
    )
    assert "The times of" not in _summary(one_epoch[1:])


def test_summary_names_each_seed_loop():
    records = [
        _epoch_record(rule, seed, 0, seed_loop=loop)
        for rule, loop in (("bp", "vmap"), ("es", "map"), ("fa", "vmap"))
        for seed in (0, 1)
    ]

    summary = _summary(records)

    assert (
        "Seeds batched under `vmap`: bp, fa. Seeds one after another under `lax.map`: es."
        in summary
    )
    assert "No single seed loop" not in summary


def test_summary_names_rules_without_one_loop():
    # bp's records predate the field; es resumed under lax.map after an epoch without it.
    records = [_epoch_record("bp", seed, 0) for seed in (0, 1)]
    records += [_epoch_record("es", seed, 0) for seed in (0, 1)]
    records += [_epoch_record("es", seed, 1, seed_loop="map") for seed in (0, 1)]
    records += [_epoch_record("fa", seed, 0, seed_loop="vmap") for seed in (0, 1)]

    summary = _summary(records)

    assert (
        "Seeds batched under `vmap`: fa. No single seed loop recorded for every epoch: bp, es."
        in summary
    )


def test_no_loop_line_one_seed_or_old():
    one_seed = [_epoch_record("bp", 0, 0, seed_loop="map")]
    old = [_epoch_record("bp", seed, 0) for seed in (0, 1)]

    assert "Seeds" not in _summary(one_seed)
    assert "Seeds" not in _summary(old)
    assert "seed loop" not in _summary(old)


def test_one_seed_shows_accuracy_without_spread():
    records = [_epoch_record("bp", 0, 0, test_accuracy=0.87)]
    rows = reporting.summarize(records)

    assert reporting.table_rows(rows)[0][1] == "87.00"
    assert "| bp     |               87.00 |" in reporting.markdown_table(rows)
    latex = reporting.latex_table(rows)
    assert " bp     &               87.00 &" in latex
    assert "pm" not in latex


def test_two_seeds_show_mean_and_std():
    # Accuracies 80 % and 90 %: mean 85, population standard deviation 5.
    records = [
        _epoch_record("bp", 0, 0, test_accuracy=0.8),
        _epoch_record("bp", 1, 0, test_accuracy=0.9),
    ]
    rows = reporting.summarize(records)

    assert "| bp     |        85.00 ± 5.00 |" in reporting.markdown_table(rows)
    assert " bp     &    85.00 $\\pm$ 5.00 &" in reporting.latex_table(rows)


def test_held_out_spread_only_with_two_seeds():
    measures = [
        {"held_out_init/infonce": 2.0, "held_out/infonce": 1.0},
        {"held_out_init/infonce": 4.0, "held_out/infonce": 1.0},
    ]
    two = [_epoch_record("gim", seed, 0, **m) for seed, m in enumerate(measures)]

    one_cells = reporting.held_out_rows(reporting.summarize(two[:1]))
    two_cells = reporting.held_out_rows(reporting.summarize(two))

    assert one_cells == [["gim", "infonce", "2.0000", "1.0000", "-50.0"]]
    assert two_cells == [["gim", "infonce", "3.0000 ± 1.0000", "1.0000 ± 0.0000", "-66.7"]]


def _visible_ticks(ax):
    low, high = ax.get_xlim()
    return [tick for tick in ax.get_xticks() if low <= tick <= high]


def test_curves_plot_whole_epochs_trained():
    # Three epochs, numbered 0, 1, 2 in results.jsonl; on their own they get ticks 0.25 apart.
    records = [
        _epoch_record("bp", seed, epoch, test_accuracy=0.5 + 0.1 * epoch)
        for seed in (0, 1)
        for epoch in range(3)
    ]
    ax = Figure().add_subplot()

    reporting.draw_curves(ax, records)

    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == [50.0, 60.0, 70.0]
    ticks = _visible_ticks(ax)
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    assert set(np.arange(1, 4)) <= set(ticks)
    assert ax.get_xlabel() == "epochs trained"


def _results_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [json.dumps(_epoch_record("bp", seed, 0)) for seed in (0, 1)]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    (out / "config.json").write_text(json.dumps({"dataset": "digits", "seeds": [0, 1]}))
    return out


def _config_is_a_list(out):
    (out / "config.json").write_text("[1, 2]")
    return "does not contain a comparison config (a JSON object); it is damaged"


def _config_not_json(out):
    (out / "config.json").write_text("not json")
    return "config.json (Expecting value: line 1 column 1 (char 0)); it is damaged"


def _results_not_utf8(out):
    with open(out / "results.jsonl", "ab") as file:
        file.write(b"\xff\n")
    return "results.jsonl: byte 0xff at offset"


def _results_a_folder(out):
    (out / "results.jsonl").unlink()
    (out / "results.jsonl").mkdir()
    return "results.jsonl is a folder; results.jsonl must be a file"


def _results_empty(out):
    (out / "results.jsonl").write_text("")
    return "contains no epoch records, so there is nothing to tabulate"


@pytest.mark.parametrize(
    "damage", [_config_is_a_list, _config_not_json, _results_not_utf8, _results_a_folder,
               _results_empty]
)
def test_render_rejects_damaged_folder_and_keeps_tables(tmp_path, damage):
    out = _results_folder(tmp_path)
    reporting.render(out)
    before = (out / "summary.md").read_text()
    message = damage(out)

    with pytest.raises(ValueError, match=re.escape(message)):
        reporting.render(out)

    assert (out / "summary.md").read_text() == before


def test_record_without_its_fields_skipped(tmp_path, caplog):
    out = _results_folder(tmp_path)
    with open(out / "results.jsonl", "a") as file:
        file.write(json.dumps({"rule": "bp", "seed": "x", "epoch": 0}) + "\n")
        file.write(json.dumps({"record": "epoch", "rule": "bp", "seed": 2, "epoch": 0}) + "\n")
        file.write("[1, 2]\n")
        file.write(json.dumps(_epoch_record("bp", 3, 0, test_accuracy="x")) + "\n")
        diagnostics = {"record": "diagnostics", "rule": "bp", "seed": 0, "epoch": 0,
                       "update_cosine/block0": "x"}
        file.write(json.dumps(diagnostics) + "\n")

    rows = reporting.render(out)

    assert [row["rule"] for row in rows] == ["bp"]
    assert rows[0]["statuses"] == {"finished": 2}
    assert caplog.text.count("not a result record") == 5

    # One compare reads the file several times; each line is warned about once.
    reporting.render(out)
    assert caplog.text.count("not a result record") == 5


def test_table_keeps_trailing_zeros():
    row = {**reporting.summarize([_epoch_record("bp", 0, 0)])[0], "epoch_seconds": 0.03}

    table = reporting.markdown_table([row])

    assert "|       0.030 |" in table


def test_curves_show_a_single_epoch():
    ax = Figure().add_subplot()

    reporting.draw_curves(ax, [_epoch_record("bp", 0, 0)])

    (line,) = ax.get_lines()
    assert line.get_marker() == "o"
    assert _visible_ticks(ax) == [1.0]
