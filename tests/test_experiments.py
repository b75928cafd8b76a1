"""Comparison runs: divergence isolation, atomic results, resume after SIGKILL, config checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bpalt import checkpoint, config, experiments, rules, train

TIMING = ("epoch_seconds", "ms_per_step")
SMALL = """
rules = ["bp", "fa"]
epochs = {epochs}
seeds = 2
diagnostics_every = 2

[model]
name = "digits_cnn"
channels = [4, 8]
"""


def _all_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _records(out: Path) -> list[dict]:
    return [r for r in _all_records(out) if r["record"] == "epoch"]


def _without_timing(records):
    return sorted(
        tuple(sorted((k, v) for k, v in r.items() if k not in TIMING)) for r in records
    )


def _compare(out: Path, epochs: int, show_progress=False, **overrides):
    settings = {
        "rules": ["bp", "fa"],
        "epochs": epochs,
        "seeds": 2,
        "diagnostics_every": 2,
        "model": {"name": "digits_cnn", "channels": [4, 8]},
    }
    comparison = config.make_comparison({**settings, **overrides}, {})
    return experiments.compare(comparison, out, show_progress=show_progress)


def test_diverged_run_recorded_others_finish(tmp_path):
    out = tmp_path / "run"
    rows = _compare(
        out, 3, diagnostics_every=0, rule={"fa": {"optimizer": "sgd", "learning_rate": 1e12}}
    )

    records = _records(out)
    fa = [r for r in records if r["rule"] == "fa"]
    bp = [r for r in records if r["rule"] == "bp"]
    assert {r["status"] for r in fa} == {"diverged"}
    assert all(r["epoch"] == 0 for r in fa)
    assert [r["status"] for r in bp if r["epoch"] == 2] == ["finished", "finished"]
    by_rule = {row["rule"]: row for row in rows}
    assert by_rule["fa"]["statuses"] == {"diverged": 2}
    assert by_rule["bp"]["accuracy_mean"] > 50
    assert "diverged at epoch 0" in (out / "summary.md").read_text()


def test_bad_batch_size_rejected_early(tmp_path):
    out = tmp_path / "run"
    message = "rule 'hsic' at batch size 1: HSIC needs a batch of at least 2 examples"
    with pytest.raises(ValueError, match=message):
        _compare(out, 1, rules=["bp", "hsic"], rule={"hsic": {"batch_size": 1}})
    assert not out.exists()


def test_failing_rule_recorded_others_finish(tmp_path, monkeypatch):
    from bpalt.rules import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_TRAINING", dict(registry._TRAINING))

    @rules.register("broken_for_test")
    def broken(network, loss="cross_entropy"):
        rule = rules.backprop(network, loss)

        def update(state, params, batch, key):
            raise RuntimeError("update exploded")

        return rule._replace(update=update)

    out = tmp_path / "run"
    rows = _compare(out, 1, diagnostics_every=0, rules=["broken_for_test", "bp"])

    records = _records(out)
    assert {(r["rule"], r["status"]) for r in records} == {
        ("broken_for_test", "failed"), ("bp", "finished")
    }
    failed = [r for r in records if r["rule"] == "broken_for_test"]
    assert [r["error"] for r in failed] == ["RuntimeError: update exploded"] * 2
    assert {row["rule"]: row["statuses"] for row in rows}["broken_for_test"] == {"failed": 2}


def test_results_one_line_per_rule_seed_epoch(tmp_path):
    out = tmp_path / "run"
    _compare(out, 2)

    keys = [(r["rule"], r["seed"], r["epoch"]) for r in _records(out)]
    assert sorted(keys) == sorted(
        (rule, seed, epoch) for rule in ("bp", "fa") for seed in (0, 1) for epoch in (0, 1)
    )
    diagnosed = [r for r in _all_records(out) if r["record"] == "diagnostics"]
    assert {r["step"] for r in diagnosed} == {1, *range(2, 45, 2)}
    assert all("update_cosine/block0" in r for r in diagnosed)


def test_rerun_skips_finished(tmp_path, capsys):
    out = tmp_path / "run"
    _compare(out, 2)
    before = (out / "results.jsonl").read_text()
    capsys.readouterr()

    _compare(out, 2, show_progress=True)

    assert (out / "results.jsonl").read_text() == before
    assert "training" not in capsys.readouterr().err


def test_changed_config_rejected(tmp_path):
    out = tmp_path / "run"
    _compare(out, 1)

    with pytest.raises(experiments.ConfigMismatchError, match=r"epochs: 1 -> 2"):
        _compare(out, 2)


def test_seed_loop_reaches_each_rule(tmp_path, monkeypatch):
    loops = {}
    make_seeds_step = train.make_seeds_step

    def recording(rule, optimizer, seed_loop="auto"):
        loops[rule.name] = seed_loop
        return make_seeds_step(rule, optimizer, seed_loop)

    monkeypatch.setattr(train, "make_seeds_step", recording)
    out = tmp_path / "run"

    _compare(out, 1, seed_loop="vmap", rule={"fa": {"seed_loop": "map"}})

    assert loops == {"bp": "vmap", "fa": "map"}
    runs = json.loads((out / "config.json").read_text())["runs"]
    assert {run["rule"]: run["seed_loop"] for run in runs} == loops


def test_records_name_loop_that_ran(tmp_path, monkeypatch):
    chosen = []
    choose_seed_loop = train.choose_seed_loop

    def recording(*args):
        chosen.append(choose_seed_loop(*args))
        return chosen[-1]

    monkeypatch.setattr(train, "choose_seed_loop", recording)
    out = tmp_path / "run"

    _compare(out, 1, rule={"fa": {"seed_loop": "map"}})

    loops = {(r["rule"], r["seed_loop"]) for r in _records(out)}
    assert loops == {("bp", "vmap"), ("fa", "map")}
    assert set(chosen) == {"vmap"}
    summary = (out / "summary.md").read_text()
    assert "Seeds batched under `vmap`: bp. Seeds one after another under `lax.map`: fa." in summary


def test_changed_seed_loop_rejected(tmp_path):
    out = tmp_path / "run"
    _compare(out, 1, seed_loop="map")

    with pytest.raises(experiments.ConfigMismatchError, match=r"seed_loop: 'map' -> 'vmap'"):
        _compare(out, 1, seed_loop="vmap")


def test_old_folder_resumes_as_auto(tmp_path):
    out = tmp_path / "run"
    _compare(out, 1)
    path = out / "config.json"
    record = json.loads(path.read_text())
    for run in record["runs"]:
        del run["seed_loop"]
    path.write_text(json.dumps(record))
    before = (out / "results.jsonl").read_text()

    _compare(out, 1)

    assert (out / "results.jsonl").read_text() == before
    with pytest.raises(experiments.ConfigMismatchError, match=r"seed_loop: 'auto' -> 'map'"):
        _compare(out, 1, seed_loop="map")


@pytest.mark.parametrize("runs", [["bp", "fa"], {"bp": {}}, [{"epochs": 1}]])
def test_damaged_runs_list_rejected(tmp_path, runs):
    out = tmp_path / "run"
    _compare(out, 1)
    path = out / "config.json"
    record = json.loads(path.read_text())
    record["runs"] = runs
    path.write_text(json.dumps(record))

    with pytest.raises(ValueError, match="invalid runs list .* damaged: choose another --out"):
        _compare(out, 1)


def test_folder_with_other_files_rejected(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")

    with pytest.raises(ValueError, match=r"already contains files but no comparison"):
        _compare(out, 1)

    assert (out / "summary.md").read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["summary.md"]


def test_empty_existing_folder_accepted(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()

    _compare(out, 1)

    assert (out / "results.jsonl").exists()


def test_emptied_log_with_checkpoint_rejected(tmp_path):
    out = tmp_path / "run"
    comparison = config.make_comparison(
        {"rules": ["bp"], "epochs": 2, "seeds": 1, "diagnostics_every": 0,
         "model": {"name": "digits_cnn", "channels": [4, 8]}}, {}
    )
    calls = iter([True])
    with pytest.raises(KeyboardInterrupt):
        experiments.compare(comparison, out, show_progress=False, should_stop=lambda: next(calls))
    checkpoint_path = out / "checkpoints" / "bp.msgpack"
    assert checkpoint_path.exists()
    (out / "results.jsonl").write_text("")

    with pytest.raises(ValueError, match=r"has no record of epoch 0 of rule 'bp', seed 0"):
        experiments.compare(comparison, out, show_progress=False)

    assert checkpoint_path.exists()


def test_data_dir_for_digits_rejected_by_api(tmp_path):
    with pytest.raises(ValueError, match=r"is not used by dataset 'digits'"):
        config.make_comparison({"rules": ["bp"], "data_dir": str(tmp_path)}, {})
    with pytest.raises(ValueError, match=r"bundled with scikit-learn"):
        config.make_comparison({"rules": ["bp"]}, {"dataset": "digits", "data_dir": tmp_path})


def test_data_dir_kept_for_file_datasets(tmp_path):
    for dataset in ("mnist", "mnist_t10k", "cifar10"):
        comparison = config.make_comparison(
            {"rules": ["bp"]}, {"dataset": dataset, "data_dir": tmp_path}
        )
        assert comparison.data_dir == str(tmp_path)


def test_truncated_last_line_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"rule": "bp", "seed": 0, "epoch": 0, "status": "running"}\n{"rule": "b')

    records = experiments.read_results(path)

    assert records == [{"rule": "bp", "seed": 0, "epoch": 0, "status": "running"}]


def test_keep_preserves_unreadable_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    kept_record = '{"rule": "bp", "seed": 0, "epoch": 0, "status": "running"}\n'
    dropped_record = '{"rule": "bp", "seed": 0, "epoch": 1, "status": "running"}\n'
    foreign = '{"rule": "bp", "seed": 0, "epoch": 1, "status": "running", "note": "x"}\n'
    garbage = "not json\n"
    path.write_text(kept_record + foreign + garbage + dropped_record + '{"rule": "b')

    experiments.ResultsLog(path).keep(lambda record: record["epoch"] == 0)

    assert path.read_text() == kept_record + foreign + garbage


def test_null_seed_loop_is_a_record(tmp_path):
    path = tmp_path / "results.jsonl"
    line = {"rule": "bp", "seed": 0, "epoch": 0, "status": "running", "seed_loop": None}
    path.write_text(json.dumps(line) + "\n")

    assert experiments.read_results(path) == [line]


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    config_file = tmp_path / "small.toml"
    config_file.write_text(SMALL.format(epochs=6))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    base = [sys.executable, "-m", "bpalt.cli", "compare", "--quiet", "--config", str(config_file)]

    subprocess.run([*base, "--out", str(reference)], check=True, timeout=600)

    process = subprocess.Popen([*base, "--out", str(killed)])
    results = killed / "results.jsonl"

    def fa_started():
        return results.exists() and any(
            json.loads(line)["rule"] == "fa" for line in results.read_text().splitlines()[-1:]
        )

    assert _wait_for(fa_started, timeout=300)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = _records(killed)
    finished_bp = [r for r in interrupted if r["rule"] == "bp"]
    assert len(finished_bp) == 12
    assert any(r["rule"] == "fa" for r in interrupted)
    assert not all(r["status"] == "finished" for r in interrupted if r["rule"] == "fa")

    subprocess.run([*base, "--out", str(killed)], check=True, timeout=600)

    final = _records(killed)
    assert [r for r in final if r["rule"] == "bp"] == finished_bp
    keys = [(r["rule"], r["seed"], r["epoch"]) for r in final]
    assert len(keys) == len(set(keys))
    assert _without_timing(_all_records(killed)) == _without_timing(_all_records(reference))


def test_should_stop_then_resume(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    _compare(reference, epochs=3)
    calls = []

    def stop_after_second_epoch():
        calls.append(True)
        return len(calls) == 2

    comparison = config.make_comparison(
        {
            "rules": ["bp", "fa"],
            "epochs": 3,
            "seeds": 2,
            "diagnostics_every": 2,
            "model": {"name": "digits_cnn", "channels": [4, 8]},
        },
        {},
    )
    with pytest.raises(KeyboardInterrupt):
        experiments.compare(comparison, stopped, should_stop=stop_after_second_epoch)

    assert {(r["rule"], r["epoch"]) for r in _records(stopped)} == {("bp", 0), ("bp", 1)}
    assert (stopped / "checkpoints" / "bp.msgpack").exists()

    _compare(stopped, epochs=3)
    assert _without_timing(_all_records(stopped)) == _without_timing(_all_records(reference))


def _held_out_reference(comparison, rule_name, state, index):
    """The rule's registered measure on seed ``index`` of ``state``, computed directly."""
    dataset = experiments.load_dataset(comparison)
    network = config.build_network(comparison, dataset.input_shape, dataset.num_classes)
    evaluate = rules.held_out_evaluator(rule_name, network)
    seed_state = jax.tree.map(lambda leaf: leaf[index], state)
    x = dataset.x_test[: experiments.HELD_OUT_EXAMPLES]
    y = dataset.y_test[: experiments.HELD_OUT_EXAMPLES]
    return evaluate(seed_state.rule_state, seed_state.params, x, y)


@pytest.mark.parametrize(
    "rule_name, model, measure",
    [
        ("gim", {"name": "digits_cnn", "channels": [4, 8]}, "infonce"),
        ("hsic", {"name": "mlp", "hidden": [16, 10]}, "unformatted_accuracy"),
    ],
)
def test_held_out_measures_recorded_and_summarised(tmp_path, rule_name, model, measure):
    out = tmp_path / "run"
    settings = {
        "rules": [rule_name], "epochs": 2, "seeds": 2, "model": model, "diagnostics_every": 0
    }
    comparison = config.make_comparison(settings, {})
    rows = experiments.compare(comparison, out, show_progress=False)

    records = [r for r in _records(out) if r["rule"] == rule_name]
    baseline = [r for r in _records(out) if r["rule"] == "random_features"]
    assert baseline and not any(k.startswith("held_out") for r in baseline for k in r)

    dataset = experiments.load_dataset(comparison)
    network = config.build_network(comparison, dataset.input_shape, dataset.num_classes)
    spec = next(s for s in comparison.runs() if s.rule == rule_name)
    rule = rules.get(rule_name, network, **spec.hyperparameters)
    initial = train.init_seeds(rule, network, spec.make_optimizer(), comparison.seeds)
    final, _ = checkpoint.load(out / "checkpoints" / f"{rule_name}.msgpack", initial)
    for index, seed in enumerate(comparison.seeds):
        first = next(r for r in records if r["seed"] == seed and r["epoch"] == 0)
        last = next(r for r in records if r["seed"] == seed and r["epoch"] == 1)
        expected_initial = _held_out_reference(comparison, rule_name, initial, index)
        expected_final = _held_out_reference(comparison, rule_name, final, index)
        assert first[f"held_out_init/{measure}"] == pytest.approx(expected_initial[measure])
        assert last[f"held_out/{measure}"] == pytest.approx(expected_final[measure])
        assert f"held_out_init/{measure}" not in last

    row = next(r for r in rows if r["rule"] == rule_name)
    finals = [r[f"held_out/{measure}"] for r in records if r["epoch"] == 1]
    assert row["held_out"][measure]["final_mean"] == pytest.approx(np.mean(finals))
    summary = (out / "summary.md").read_text()
    assert "Held-out measures" in summary
    assert f"| {rule_name}" in summary
    if measure == "unformatted_accuracy":
        assert all(0.0 <= value <= 1.0 for value in finals)
