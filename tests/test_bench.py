"""The benchmark runs end to end on a tiny configuration; its peers match the workloads.

No timing is asserted: the figures depend on the machine and its load.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bpalt import bench, losses, nn, reporting, rules, workloads
from bpalt.rules import registry
from bpalt.rules.base import UpdateRule

TINY = dict(
    workloads=("W1",),
    steps=2,
    rounds=1,
    warmup=0,
    batch_size=4,
    peers=False,
    seeds=2,
    es_population=4,
    local_batch=0,
    ntk_examples=0,
    matmul_size=64,
    epochs=1,
    epoch_steps=2,
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _zero_rule(network, loss=losses.softmax_cross_entropy):
    """A rule that is not part of the library: zero direction, true loss."""

    def update(state, params, batch, key):
        del key
        x, y = batch
        grads = jax.tree.map(jnp.zeros_like, params)
        return grads, state, {"loss": loss(network.apply(params, x), y)}

    return UpdateRule(lambda key, params: (), update, lambda s, p, x: network.apply(p, x), "zero")


@pytest.fixture
def registry_with_new_rule(monkeypatch):
    """The registry holding ``bp`` and a rule registered after the benchmark was written."""
    monkeypatch.setattr(registry, "_REGISTRY", {"bp": rules.backprop, "zero": _zero_rule})
    monkeypatch.setattr(registry, "_TRAINING", {"bp": {}, "zero": {}})


def test_default_settings_cover_every_registered_rule(registry_with_new_rule):
    assert bench._rule_names(bench.Settings()) == ("bp", "zero")


def test_benchmark_runs_end_to_end(registry_with_new_rule, tmp_path):
    settings = bench.Settings(**TINY, seed_rules=("bp",))
    messages = []
    results = bench.run(settings, log=messages.append)
    assert "  W1: seeds and epoch of rule bp" in messages

    steps = results["workloads"]["W1"]["steps"]
    names = [row["name"] for row in steps["rows"]]
    assert names[:3] == ["jax.grad + optax", "bp", "zero"]
    assert "plain JAX (lax.conv)" in names
    for row in steps["rows"]:
        assert row["steps"] == 2
        assert row["median_ms"] > 0
    assert [row["rule"] for row in results["workloads"]["W1"]["seeds"]] == ["bp"]
    seeds_row = results["workloads"]["W1"]["seeds"][0]
    assert {seeds_row["loop"], seeds_row["other_loop"]} == {"vmap", "map"}
    assert seeds_row["one_seed_loop"] == "map"
    assert seeds_row["wide_batch"] == 2 * TINY["batch_size"]
    assert results["workloads"]["W1"]["epochs"][0]["steps_per_epoch"] == 2
    assert any(t["target"] == "W1: bp / jax.grad + optax step" for t in results["targets"])

    md_path, json_path = bench.write_results(results, tmp_path / "bench", "tiny command")
    assert json.loads(json_path.read_text())["command"] == "tiny command"
    text = md_path.read_text()
    assert "## Targets" in text
    assert (
        "| W1: bp / PyTorch eager |  | <= 1 x | not measured | PyTorch eager not run: "
        "--no-peers |" in text
    )
    assert "- PyTorch, BioTorch and evosax: skipped, not measured (--no-peers)" in text
    assert steps["skipped"] == {"peers": "not measured (--no-peers)"}
    assert "| zero | rule |" in text
    assert "rules at batch 0" not in text
    assert "A 64x64 matmul is too small to reach the machine's rate (use at least 1024)" in text

    assert md_path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    md_path.write_text(text + "Hand-written analysis.\n")
    bench.write_results(results, tmp_path / "bench", "tiny command")
    assert "Hand-written analysis." in md_path.read_text()


def test_local_and_ntk_sections_follow_rules():
    x, y, _ = workloads.training_data(workloads.W1, None)
    only_bp = bench.Settings(**{**TINY, "local_batch": 8, "ntk_examples": 4}, rules=("bp",))
    local = bench.local_rules(workloads.W1, only_bp, x, y, lambda message: None)
    assert local["rows"] == []
    assert local["skipped"] == {name: "not selected by --rules" for name in bench.LOCAL_RULES}
    assert "not selected" in bench.ntk_times(workloads.W1, only_bp, x, lambda m: None)["skipped"]

    with_hsic = bench.Settings(**{**TINY, "local_batch": 8}, rules=("bp", "hsic"))
    local = bench.local_rules(workloads.W1, with_hsic, x, y, lambda message: None)
    assert [row["name"] for row in local["rows"]] == ["bp", "hsic", "hsic (plain estimator)"]
    assert local["skipped"] == {"gim": "not selected by --rules"}


def _timed_row(name, median_ms):
    return {"name": name, "median_ms": median_ms, "rounds_ms": [median_ms],
            "ratio_to_reference": median_ms, "flops": None}


def _peer_notes(skipped):
    rows = [_timed_row(name, 1.0) for name in ("jax.grad + optax", "bp", "fa", "dfa", "es")]
    targets = bench._step_targets("W1", rows, skipped, {"gflops": None})
    return {t["target"]: t["note"] for t in targets if t["met"] is None}


def test_peer_targets_say_no_peers_ran():
    notes = _peer_notes({bench.NO_PEERS: "not measured (--no-peers)"})

    assert notes == {
        "W1: bp / PyTorch eager": "PyTorch eager not run: --no-peers",
        "W1: fa / BioTorch fa": "BioTorch fa not run: --no-peers",
        "W1: dfa / BioTorch dfa": "BioTorch dfa not run: --no-peers",
        "W1: es generation / evosax Open_ES": "evosax Open_ES not run: --no-peers",
    }


def test_peer_targets_give_skip_reason():
    torch_missing = "torch is not installed (No module named 'torch'); install the `bench` extra"
    evosax_missing = "evosax.algorithms is not installed (No module named 'evosax')"
    skipped = {name: torch_missing for name in bench.TORCH_PEERS}
    skipped["evosax Open_ES"] = evosax_missing

    notes = _peer_notes(skipped)

    assert notes["W1: bp / PyTorch eager"] == torch_missing
    assert notes["W1: fa / BioTorch fa"] == torch_missing
    assert notes["W1: dfa / BioTorch dfa"] == torch_missing
    assert notes["W1: es generation / evosax Open_ES"] == evosax_missing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--workloads", "W9"], "unknown workload"),
        (["--rules", "nope"], "unknown rule"),
    ],
)
def test_command_line_rejects_bad_values(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


HELP_POINTER = " (see bpalt bench --help)\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed-rules", "nope"], "unknown rule 'nope'; accepted: bp, zero"),
        (["--epoch-rules", "bp,nope"], "unknown rule 'nope'; accepted: bp, zero"),
        (["--rules", "nope"], "unknown rule 'nope'; accepted: bp, zero"),
        (["--workloads", ""], "--workloads is empty; accepted: W1, W2"),
        (["--workloads", " , "], "--workloads is empty; accepted: W1, W2"),
        (
            ["--rules", ""],
            "--rules is empty; accepted: bp, zero, or leave out --rules to measure every rule",
        ),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 0, got -1"),
    ],
)
def test_bad_value_rejected_before_timing(
    argv, message, registry_with_new_rule, tmp_path, capsys
):
    out = tmp_path / "bench"

    assert bench.main([*argv, "--out", str(out)]) == 2

    captured = capsys.readouterr()
    assert captured.err == "bpalt bench: error: " + message + HELP_POINTER
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_progress_names_only_measured_parts():
    assert bench._measured_parts("bp", ("bp",), ("bp",)) == "seeds and epoch"
    assert bench._measured_parts("bp", ("bp",), ()) == "seeds"
    assert bench._measured_parts("fa", ("bp",), ("fa",)) == "epoch"


def test_empty_seed_and_epoch_rules_accepted(registry_with_new_rule):
    args = bench.build_parser().parse_args(["--seed-rules", "", "--epoch-rules", ""])

    settings = bench.settings_from_args(args)

    assert settings.seed_rules == ()
    assert settings.epoch_rules == ()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        (["--seeds-budget", "soon"], "argument --seeds-budget: invalid float value: 'soon'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_unparsable_value_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)

    assert raised.value.code == 2
    assert capsys.readouterr().err == "bpalt bench: error: " + message + HELP_POINTER


def test_batch_larger_than_training_set_rejected(tmp_path, capsys):
    examples = workloads.training_data(workloads.W1)[0].shape[0]
    out = tmp_path / "bench"
    argv = ["--workloads", "W1", "--batch-size", str(examples + 1), "--out", str(out)]

    assert bench.main(argv) == 2

    captured = capsys.readouterr()
    assert captured.err == (
        f"bpalt bench: error: batch size {examples + 1} is larger than the training set of W1 "
        f"({examples} examples); choose --batch-size {examples} or less\n"
    )
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_batch_size_checked_against_training_set():
    bench.check_batch_size(workloads.W1, 1437, 1437)

    with pytest.raises(ValueError, match=r"^batch size 1438 is larger than the training set of "
                       r"W1 \(1437 examples\); choose --batch-size 1437 or less$"):
        bench.check_batch_size(workloads.W1, 1438, 1437)


def test_run_workload_rejects_batch_before_timing():
    examples = workloads.training_data(workloads.W1)[0].shape[0]
    settings = bench.Settings(**{**TINY, "batch_size": examples + 1})
    logged = []

    with pytest.raises(ValueError, match=f"batch size {examples + 1} is larger"):
        bench.run_workload(workloads.W1, settings, logged.append)

    assert logged == []


def test_help_states_defaults(capsys):
    with pytest.raises(SystemExit) as raised:
        bench.main(["--help"])

    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("batch of the HSIC / Greedy InfoMax comparison, at most W1's training examples "
            "(default 256; 0 skips it)") in text
    assert ("inputs of the empirical NTK timing, at most W1's training examples (default 64; "
            "0 skips it)") in text
    assert ("timed epochs of the training-loop measurement, after one untimed epoch "
            "(default 2; 0 skips it)") in text
    assert "rules of the seeds measurement (default: those of --rules;" in text
    assert "writes OUT.md and OUT.json, creating missing folders (default benchmarks)" in text


def test_script_help_shows_default_out():
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench.py")
    result = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    expected = os.path.join("experiments", "results", "benchmarks")
    assert "writes OUT.md and OUT.json, creating missing folders (default " in text
    assert f"{expected})" in text


def _seeds_results(seeds):
    row = {"rule": "bp", "seeds": seeds, "loop": "map", "ratio": 1.2, "wide_ratio": 1.5}
    entry = {"steps": {"rows": [], "skipped": {}}, "seeds": [row]}
    return {"workloads": {"W1": entry}, "matmul": {"gflops": None}}


def _seeds_targets(results):
    return [t for t in bench.evaluate_targets(results) if "seed" in t["target"]]


def test_seeds_target_not_measured_with_one_seed():
    targets = _seeds_targets(_seeds_results(1))

    assert targets == [{
        "target": "W1: seeds / 1 seed (bp)", "measured": None, "limit": 1.6, "unit": "x",
        "at_least": False, "met": None, "note": "needs --seeds 2 or more, got 1",
    }]
    rendered = bench._target_lines(targets)
    assert ("| W1: seeds / 1 seed (bp) |  | <= 1.6 x | not measured | "
            "needs --seeds 2 or more, got 1 |") in rendered


def test_seeds_target_measured_with_several_seeds():
    targets = _seeds_targets(_seeds_results(3))

    assert [t["target"] for t in targets] == ["W1: 3 seeds / 1 seed (bp, map)"]
    assert targets[0]["measured"] == 1.2
    assert targets[0]["met"] is True
    assert targets[0]["note"] == "one seed at 3x the batch: 1.50x"


def test_environment_shared_with_reporting():
    shared = reporting.environment(bench.PACKAGES)

    described = bench.environment()

    assert described["machine"] == shared.pop("machine")
    assert described["versions"] == shared
    assert list(described["versions"]) == list(bench.PACKAGES)
    for extra in ("xla_flags", "conv_default", "blas_threads"):
        assert extra in described


def _weight_shapes(network):
    params = jax.eval_shape(network.init, jax.random.key(0))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [leaf.shape for path, leaf in leaves if path[-1].key == "w"]


@pytest.mark.parametrize("workload", list(workloads.WORKLOADS.values()), ids=lambda w: w.name)
def test_peer_models_have_the_workload_shapes(workload):
    network = workload.build()
    init, apply = bench.plain_jax_model(workload.layers, network.input_shape)
    params = init(0)
    assert [w.shape for w, _ in params] == _weight_shapes(network)
    x = jnp.zeros((2, *network.input_shape))
    assert apply(params, x).shape == (2, *network.output_shape)


@pytest.mark.parametrize("workload", list(workloads.WORKLOADS.values()), ids=lambda w: w.name)
def test_torch_model_has_the_workload_size(workload):
    torch = pytest.importorskip("torch")
    network = workload.build()
    model = bench.torch_model(torch, workload.layers, network.input_shape)
    x = torch.zeros((2, network.input_shape[-1], *network.input_shape[:2]))
    assert tuple(model(x).shape) == (2, *network.output_shape)
    size = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(bench.draw_params(network)))
    assert sum(p.numel() for p in model.parameters()) == size


def test_random_data_has_the_network_shape():
    network = workloads.W2.build()
    x, y, source = workloads.training_data(workloads.W2, data_dir=None)
    assert x.shape == (workloads.RANDOM_EXAMPLES, *network.input_shape)
    assert y.dtype == jnp.int32
    assert "random" in source
    batch_x, batch_y = workloads.first_batch(x[:3], y[:3], 8)
    assert batch_x.shape == (8, *network.input_shape)
    assert batch_y.shape == (8,)


# The convolution the benchmark chose (``nn.conv2d``'s default) in forward and reverse
# mode against XLA's convolution, including the one-channel path the layer tests leave out.

CONV_CASES = [
    ((9, 9, 1), 3, 5, 1, "VALID"),
    ((8, 8, 1), 4, 3, 2, "SAME"),
    ((6, 7, 3), 5, 3, 1, "SAME"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_default_convolution_derivatives_match_xla(case):
    shape, features, kernel, stride, padding = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (2, *shape)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (kernel, kernel, shape[-1], features)), jnp.float32)
    dx, dw = (jnp.asarray(rng.uniform(-1, 1, a.shape), jnp.float32) for a in (x, w))

    def ours(x, w):
        return nn.CONV_IMPLEMENTATIONS["patches"](x, w, stride=stride, padding=padding)

    def xla(x, w):
        return lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y, tangent = jax.jvp(ours, (x, w), (dx, dw))
    y_ref, tangent_ref = jax.jvp(xla, (x, w), (dx, dw))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tangent, tangent_ref, rtol=1e-5, atol=1e-5)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    grads = jax.grad(loss(ours), (0, 1))(x, w)
    grads_ref = jax.grad(loss(xla), (0, 1))(x, w)
    for ours_leaf, ref_leaf in zip(grads, grads_ref):
        np.testing.assert_allclose(ours_leaf, ref_leaf, rtol=1e-4, atol=1e-4)

    hvp = jax.jvp(jax.grad(loss(ours), 1), (x, w), (dx, dw))[1]
    hvp_ref = jax.jvp(jax.grad(loss(xla), 1), (x, w), (dx, dw))[1]
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-4, atol=1e-4)


def test_repeated_names_measured_once():
    args = bench.build_parser().parse_args(["--workloads", "W1,w1", "--rules", "bp,fa,bp"])

    settings = bench.settings_from_args(args)

    assert settings.workloads == ("W1",)
    assert settings.rules == ("bp", "fa")


def test_targets_listed_when_parts_skipped():
    entry = {"steps": {"rows": [_timed_row("jax.grad + optax", 1.0), _timed_row("bp", 1.0)],
                       "skipped": {}},
             "seeds": [], "skipped": {},
             "local_rules": {"batch_size": 0, "rows": [],
                             "skipped": {"all": "not measured (--local-batch 0)"}},
             "ntk": {"rows": [], "skipped": "not measured (--ntk-examples 0)"}}
    results = {"workloads": {"W1": entry}, "matmul": {"size": 2048, "gflops": None}}

    notes = {t["target"]: t["note"] for t in bench.evaluate_targets(results) if t["met"] is None}

    assert notes == {
        "W1: bp / PyTorch eager": "not measured",
        "W1: fa / bp": "not selected by --rules",
        "W1: dfa / bp": "not selected by --rules",
        "W1: es generation / evosax Open_ES": "es not selected by --rules",
        "W1: seeds / 1 seed (bp)": "bp not in --seed-rules",
        "W1: hsic / bp at batch 256": "not measured (--local-batch 0)",
        "W1: gim / bp at batch 256": "not measured (--local-batch 0)",
        "W1: empirical NTK of 64 inputs (64 x 64 kernel)": "not measured (--ntk-examples 0)",
    }


@pytest.mark.parametrize("workload", [workloads.W1, workloads.W2], ids=["W1", "W2"])
def test_backprop_flops_match_plain_xla(workload):
    # XLA counts the plain model's forward pass, activations and pools included. Its SAME
    # convolutions skip the padding's products, which the nominal count keeps.
    x = jnp.zeros((4, *workload.build().input_shape), jnp.float32)
    init, apply = bench.plain_jax_model(workload.layers, x.shape[1:])
    analysis = jax.jit(apply).lower(init(0), x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    xla_flops = 3.0 * analysis["flops"]

    flops = bench.backprop_flops(workload, x.shape[1:], 4)

    if workload.name == "W2":
        # Multiply-adds of one example: two VALID 5 x 5 convolutions and three dense layers.
        macs = 24 * 24 * 6 * 25 + 8 * 8 * 16 * 150 + 256 * 120 + 120 * 84 + 84 * 10
        assert flops == 3 * 2 * macs * 4
        assert flops <= xla_flops <= 1.05 * flops
    else:
        assert 0.6 * flops <= xla_flops <= flops


def test_stretch_target_needs_a_large_matmul():
    bp = {**_timed_row("bp", 2.0), "flops": 2e8}
    rows = [_timed_row("jax.grad + optax", 2.0), bp, {**_timed_row(bench.MATMUL, 1.0),
                                                      "flops": 2.0 * 512**3}]

    def stretch(size):
        targets = bench._step_targets("W2", rows, {}, {"size": size, "gflops": None})
        return next(t for t in targets if "stretch" in t["target"])

    assert stretch(512)["met"] is None
    assert stretch(512)["note"] == f"needs --matmul-size {bench.SMALL_MATMUL} or more"
    measured = stretch(2048)
    assert measured["measured"] == pytest.approx((2e8 / 2e-3) / (2.0 * 512**3 / 1e-3))
    # bp does 2e8 FLOP in 2 ms, and the matmul 2 * 512^3 FLOP in 1 ms.
    assert measured["note"] == "bp 100.0 of 268.4 GFLOP/s"


def test_step_targets_without_bp():
    rows = [_timed_row("jax.grad + optax", 2.0), _timed_row("fa", 2.0),
            _timed_row("BioTorch fa (2 threads)", 4.0)]

    targets = bench._step_targets("W2", rows, {}, {"size": 2048, "gflops": 100.0})

    by_name = {t["target"]: t for t in targets}
    for name in ("W2: bp / jax.grad + optax step", "W2: bp step", "W2: fa / bp",
                 "W2 (stretch): bp FLOP rate / matmul rate"):
        assert by_name[name]["met"] is None
        assert by_name[name]["note"] == "bp not selected by --rules"
    assert by_name["W2: fa / BioTorch fa"]["measured"] == pytest.approx(0.5)
    assert by_name["W2: fa / BioTorch fa"]["met"] is True


def test_local_target_of_failed_variant():
    local = {"batch_size": 1, "rows": [],
             "skipped": {"hsic": "ValueError: batch", "hsic (plain estimator)": "ValueError: b"}}

    notes = {t["target"]: t["note"] for t in bench._local_targets(local)}

    assert notes == {"W1: hsic / bp at batch 1": "ValueError: batch",
                     "W1: hsic (plain estimator) / bp at batch 1": "ValueError: b"}


def test_local_target_notes_variant():
    rows = [{**_timed_row("hsic", 5.0), "ratio_to_bp": 2.5},
            {**_timed_row("hsic (plain estimator)", 3.5), "ratio_to_bp": 1.75},
            {**_timed_row("gim", 3.0), "ratio_to_bp": 1.5}]

    targets = bench._local_targets({"batch_size": 256, "rows": rows, "skipped": {}})

    notes = {t["target"]: t["note"] for t in targets}
    assert notes == {
        "W1: hsic / bp at batch 256":
            "hsic (plain estimator): 1.75 x; the default took 1.50 ms more",
        "W1: hsic (plain estimator) / bp at batch 256": "not the registered default",
        "W1: gim / bp at batch 256": "",
    }


@pytest.mark.parametrize(
    "out, expected",
    [("runs/bench.1", ("runs/bench.1.md", "runs/bench.1.json")),
     ("runs/bench", ("runs/bench.md", "runs/bench.json")),
     ("runs/bench.md", ("runs/bench.md", "runs/bench.json"))],
)
def test_output_paths_append_suffixes(out, expected):
    assert tuple(map(str, bench.output_paths(out))) == expected


def _tiny_argv(tmp_path):
    return ["--workloads", "W1", "--rules", "bp", "--steps", "2", "--rounds", "1", "--warmup",
            "0", "--batch-size", "4", "--no-peers", "--seed-rules", "", "--epoch-rules", "",
            "--local-batch", "0", "--ntk-examples", "0", "--matmul-size", "64", "--quiet",
            "--out", str(tmp_path / "bench")]


@pytest.mark.parametrize(
    "error, status, message",
    [(KeyboardInterrupt(), 130, "bpalt bench: interrupted; the measurements finished so far "
      "are in"),
     (MemoryError("out of memory"), 1, "bpalt bench: error: MemoryError: out of memory; the "
      "measurements finished so far are in")],
)
def test_stopped_run_keeps_finished_measurements(tmp_path, monkeypatch, capsys, error, status,
                                                 message):
    def stop_after_steps(workload, settings, x, y, log):
        raise error

    monkeypatch.setattr(bench, "seeds_and_epoch", stop_after_steps)
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))

    assert bench.main(_tiny_argv(tmp_path)) == status

    err = capsys.readouterr().err
    rescued = list(tmp_path.glob("bpalt-bench-*.json"))
    assert len(rescued) == 1
    assert f"{message} {rescued[0]}" in err
    record = json.loads(rescued[0].read_text())
    rows = record["workloads"]["W1"]["steps"]["rows"]
    assert [row["name"] for row in rows][:2] == ["jax.grad + optax", "bp"]
    assert record["stopped"] == ("interrupted" if status == 130 else "MemoryError: out of memory")
    assert not (tmp_path / "bench.md").exists()


@pytest.mark.parametrize(
    "argv, message",
    [(["--seeds", str(bench.MAX_BENCH_SEEDS + 1)], f"--seeds must be at most "
      f"{bench.MAX_BENCH_SEEDS}"),
     (["--es-population", str(bench.MAX_ES_POPULATION + 2)], "--es-population must be at most "
      f"{bench.MAX_ES_POPULATION}"),
     (["--local-batch", "100000"], "--local-batch 100000 is more than W1's 1437 training "
      "examples; use at most 1437, or 0 to skip that measurement"),
     (["--ntk-examples", "5000"], "--ntk-examples 5000 is more than W1's 1437 training "
      "examples")],
)
def test_oversized_options_rejected_early(tmp_path, capsys, argv, message):
    assert bench.main([*argv, "--workloads", "W1", "--out", str(tmp_path / "b")]) == 2

    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out", ["", "  "])
def test_blank_out_rejected(capsys, out):
    assert bench.main(["--workloads", "W1", "--out", out]) == 2

    assert "--out is blank; name the output files without their suffix" in (
        capsys.readouterr().err
    )


def test_early_interrupt_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupt(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "check_training_sets", interrupt)

    assert bench.main(["--workloads", "W1", "--out", str(tmp_path / "b")]) == 130

    assert capsys.readouterr().err == (
        "bpalt bench: interrupted before timing; nothing was measured\n"
    )


def test_small_matmul_note_only_below_threshold():
    assert bench._small_matmul_note(bench.SMALL_MATMUL) == ""
    assert "overstate" in bench._small_matmul_note(bench.SMALL_MATMUL // 2)
