"""The comparison summary: the held-out measures table or a sentence in its place; the machine."""

import os
import platform

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
    assert "| gim    | infonce   | 2.0000 ± 0.0000     | 1.0000 ± 0.0000  |" in summary
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
