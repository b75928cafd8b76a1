"""The bpalt command: bad input gives one line and status 2; a tiny comparison works."""

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from bpalt import argtypes, cli, config


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["compare", "--rules", "nope"], "unknown rule 'nope'; accepted: bp"),
        (["compare", "--dataset", "imagenet"], "unknown dataset 'imagenet'; accepted: digits"),
        (["compare", "--learning-rate", "0"], "--learning-rate: must be a positive number"),
        (["compare", "--learning-rate=-1e-3"], "must be a positive number, got -1e-3"),
        (["compare", "--epochs", "0"], "--epochs: must be a positive integer, got 0"),
        (["compare", "--seeds=-2"], "--seeds: must be a positive integer, got -2"),
        (["compare", "--batch-size", "x"], "expected a positive integer, got 'x'"),
        (["compare", "--optimizer", "lion"], "--optimizer: invalid choice: 'lion' (choose from"),
        (
            ["compare", "--seed-loop", "pmap"],
            "--seed-loop: invalid choice: 'pmap' (choose from 'auto', 'vmap', 'map')",
        ),
        (["compare", "--dataset", "mnist"], "needs a data directory"),
        (["compare", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir"),
        (["train"], "--rule"),
        (["table", "/no/such/results"], "no results.jsonl in /no/such/results"),
        (["table", __file__], "is a file; pass the folder that `bpalt compare --out` wrote"),
        (["compare", "--config", "/no/such.toml"], "config file not found (or not a file)"),
        (
            ["compare", "--diagnostics-every", "-5"],
            "argument --diagnostics-every: must be a non-negative integer (0 turns the "
            "diagnostics off), got -5",
        ),
        (
            ["compare", "--diagnostics-every", "x"],
            "argument --diagnostics-every: expected a non-negative integer",
        ),
        (["compare", "--learning-rate", "inf"], "--learning-rate: must be a finite positive"),
        (["compare", "--bogus"], "bpalt compare: error: unrecognized arguments: --bogus"),
        (["train", "--rule", "bp", "extra"], "bpalt train: error: unrecognized arguments: extra"),
        (["train", "--rule", "bp,fa"], "--rule takes one rule name, got 'bp,fa'"),
        (["train", "--rule", ""], "--rule is empty; name one rule, such as fa"),
    ],
)
def test_bad_input_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        status = cli.main(arguments)
        raise SystemExit(status)

    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def _write_config(tmp_path, text):
    """Write ``text`` as ``tmp_path / "config.toml"`` and return that path."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _compare_with_config(tmp_path, text):
    """Write ``text`` as a config file and run ``bpalt compare`` on it; return the status."""
    path = _write_config(tmp_path, text)
    return cli.main(["compare", "--config", str(path), "--out", str(tmp_path / "out")])


def test_diagnostics_every_zero_accepted():
    args = cli.build_parser().parse_args(["compare", "--diagnostics-every", "0"])

    assert args.diagnostics_every == 0


def test_diagnostics_every_config_names_key(tmp_path, capsys):
    status = _compare_with_config(tmp_path, "diagnostics_every = -5\n")

    assert status == 2
    assert "diagnostics_every must be >= 0 (0 turns it off), got -5" in capsys.readouterr().err


def test_interrupt_flag_remembers_and_raises():
    flag = cli.InterruptFlag()
    assert not flag.received

    with pytest.raises(KeyboardInterrupt):
        flag(signal.SIGINT, None)

    assert flag.received


def test_train_runs_outside_main_thread(tmp_path):
    statuses = []
    arguments = ["train", "--rule", "bp", "--epochs", "1", "--seeds", "1", "--quiet"]
    worker = threading.Thread(
        target=lambda: statuses.append(cli.main([*arguments, "--out", str(tmp_path / "out")]))
    )

    worker.start()
    worker.join()

    assert statuses == [0]


def test_closing_line_names_only_written_files(tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main(
        ["train", "--rule", "bp", "--epochs", "1", "--seeds", "1", "--diagnostics-every", "0",
         "--quiet", "--out", str(out)]
    )

    assert status == 0
    assert not (out / "alignment.png").exists()
    closing = capsys.readouterr().out.strip().splitlines()[-1]
    assert closing == f"results in {out}/ (summary.md, summary.tex, results.jsonl, curves.png)"


def test_option_choices_match_library():
    from bpalt import train

    assert cli.OPTIMIZER_CHOICES == tuple(config.OPTIMIZERS)
    assert cli.SEED_LOOP_CHOICES == train.SEED_LOOPS


@pytest.mark.parametrize(
    "text",
    ['optimizer = ["adam"]\n', 'optimizer = {name = "adam"}\n',
     'rules = ["fa"]\n[rule.fa]\noptimizer = ["adam"]\n'],
)
def test_config_rejects_optimizer_not_text(tmp_path, capsys, text):
    status = _compare_with_config(tmp_path, text)

    assert status == 2
    assert "unknown optimizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [("data_dir = 5\n", "data_dir must be text such as 'data/mnist', got 5"),
     ("dataset = 3\n", "dataset must be text such as 'digits', got 3"),
     ('loss = ["mse"]\n', "loss must be text such as 'cross_entropy', got ['mse']")],
)
def test_config_rejects_non_text_names(tmp_path, capsys, text, message):
    status = _compare_with_config(tmp_path, text)

    assert status == 2
    assert message in capsys.readouterr().err


def test_config_rejects_inf_learning_rate(tmp_path, capsys):
    status = _compare_with_config(tmp_path, "learning_rate = inf\n")

    assert status == 2
    assert "learning rate must be a finite positive number, got inf" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('seeds = "abc"', "seeds must be a positive count (seeds 0 .. N-1) or a non-empty "
         "list of distinct integers from 0 to 2**32 - 1, got 'abc'"),
        ("seeds = [1.5]", "got [1.5]"),
        ("seeds = 2.0", "got 2.0"),
        ("seeds = true", "got True"),
        ("seeds = [-1]", "got [-1]"),
        ("seeds = [1, 1]", "got [1, 1]"),
        ("seeds = []", "got []"),
        ("rules = 5", "rules must be a non-empty list of rule names, got 5; accepted: bp"),
        ("rules = [1]", "rules must be a non-empty list of rule names, got [1]"),
        ("model = 3", "model must be a model name or a [model] table, got 3; accepted names: "
         "digits_cnn"),
        ("model = []", "model must be a model name or a [model] table, got []"),
    ],
)
def test_config_wrong_type_rejected(tmp_path, capsys, line, message):
    status = _compare_with_config(tmp_path, line + "\n")

    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_config_seed_list_kept():
    from bpalt import config

    comparison = config.make_comparison({"rules": ["bp"], "seeds": [4, 7]}, {})

    assert comparison.seeds == (4, 7)


def test_unused_rule_tables_warned(caplog):
    from bpalt import config

    settings = {"rule": {"fa": {"feedback_scale": 0.5}, "dfa": {}, "hsic": {"beta": 2.0}}}
    with caplog.at_level("WARNING", logger="bpalt.config"):
        comparison = config.make_comparison({**settings, "rules": ["hsic"]}, {})

    assert comparison.rules == ("hsic", "random_features")
    assert caplog.messages == [
        "settings of [rule.fa], [rule.dfa] not used: they are not among this run's rules "
        "(hsic, random_features)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="bpalt.config"):
        config.make_comparison({**settings, "rules": ["fa", "dfa", "hsic"]}, {})
    assert caplog.messages == []


def test_unknown_model_key_lists_accepted(tmp_path, capsys):
    status = _compare_with_config(tmp_path, '[model]\nname = "digits_cnn"\nchanels = [4, 8]\n')

    assert status == 2
    err = capsys.readouterr().err
    assert (
        "unknown [model] setting(s) 'chanels' for model 'digits_cnn'; accepted: input_shape, "
        "num_classes, channels, w_init, activation" in err
    )


def _data_dir_option(tmp_path):
    return ["--data-dir", str(tmp_path / "digits-files")]


def _data_dir_in_config(tmp_path):
    config = tmp_path / "digits.toml"
    config.write_text(f'dataset = "digits"\ndata_dir = "{tmp_path / "digits-files"}"\n')
    return ["--config", str(config)]


@pytest.mark.parametrize("make_arguments", [_data_dir_option, _data_dir_in_config])
def test_data_dir_for_digits_rejected(make_arguments, tmp_path, capsys):
    arguments = ["compare", "--rules", "bp", *make_arguments(tmp_path)]

    status = cli.main([*arguments, "--out", str(tmp_path / "out")])

    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"--data-dir (data_dir) '{tmp_path / 'digits-files'}' is not used" in err
    assert "dataset 'digits', which is bundled with scikit-learn" in err
    assert (
        "applies to the data sets read from files: mnist, fashion_mnist, kmnist, mnist_t10k, "
        "fashion_mnist_t10k, kmnist_t10k, cifar10." in err
    )
    assert not (tmp_path / "out").exists()


def test_bad_config_values(tmp_path, capsys):
    status = _compare_with_config(
        tmp_path, 'rules = ["fa"]\n[rule.fa]\nfeedback_scale = -1.0\nlearning_rate = 0.0\n'
    )

    assert status == 2
    err = capsys.readouterr().err
    assert "[rule.fa]: learning rate must be a positive number, got 0.0" in err
    assert not (tmp_path / "out").exists()


def test_unknown_hyperparameter(tmp_path, capsys):
    status = _compare_with_config(tmp_path, 'rules = ["fa"]\n[rule.fa]\nfeedback_sclae = 2.0\n')

    assert status == 2
    assert "unknown hyperparameter(s) feedback_sclae for rule 'fa'" in capsys.readouterr().err


def test_shape_mismatch_rejected(tmp_path, capsys):
    status = _compare_with_config(
        tmp_path, 'rules = ["bp"]\n[model]\nname = "digits_cnn"\ninput_shape = [28, 28, 1]\n'
    )

    assert status == 2
    err = capsys.readouterr().err
    assert "(8, 8, 1)" in err
    assert "(28, 28, 1)" in err


def test_console_script_compare(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "bpalt.cli", "train", "--rule", "bp", "--epochs", "2",
        "--seeds", "2", "--quiet", "--out", str(out),
    ]  # fmt: skip

    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert finished.returncode == 0, finished.stderr
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r["record"] == "epoch"]
    assert [(r["seed"], r["epoch"]) for r in records] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert {r["status"] for r in records if r["epoch"] == 1} == {"finished"}
    for name in ("summary.md", "summary.tex", "curves.png", "config.json"):
        assert (out / name).exists(), name
    # Captured output is not a terminal, and the table's headers must still be whole.
    assert "test accuracy (%)" in finished.stdout
    assert "cosine to backprop" in finished.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["compare", "--rules", "bp", "--batch-size", "5000"], "batch size 5000 of rule 'bp'"),
        # Checked before the memory estimate, which would otherwise report this batch.
        (
            ["compare", "--rules", "bp", "--batch-size", "100000000"],
            "batch size 100000000 of rule 'bp' is larger than the training set",
        ),
        (["compare", "--rules="], "rules must be a non-empty list of rule names"),
        (["compare", "--rules", "bp,,fa"], "rules must be a non-empty list of rule names"),
    ],
)
def test_rejected_before_training(arguments, message, tmp_path, capsys):
    status = cli.main([*arguments, "--out", str(tmp_path / "out")])

    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('loss = "hinge"\n', "unknown loss 'hinge'"),
        ('dataset = "imagenet"\n', "unknown dataset 'imagenet'"),
        ('data_dir = "data/mnist"\n', "--data-dir (data_dir) 'data/mnist' is not used"),
    ],
)
def test_config_name_errors_name_file(tmp_path, capsys, text, message):
    status = _compare_with_config(tmp_path, text)

    assert status == 2
    assert f"{tmp_path / 'config.toml'}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_data_dir_with_dataset_option(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "missing"}"\n')

    status = cli.main(["compare", "--config", str(config), "--dataset", "mnist",
                       "--out", str(tmp_path / "out")])

    # The folder suits mnist, so the error is that it does not exist.
    assert status == 2
    err = capsys.readouterr().err
    assert "is not used by dataset" not in err
    assert str(tmp_path / "missing") in err


def test_config_with_byte_order_mark(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xef\xbb\xbfepochs = 1\n")

    assert config.read_toml(path) == {"epochs": 1}


def test_empty_config_option_rejected(tmp_path, capsys):
    status = cli.main(["compare", "--config", "", "--out", str(tmp_path / "out")])

    assert status == 2
    assert "--config is empty; name a TOML file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_network_error_not_blamed_on_table(tmp_path, capsys):
    text = '[model]\nname = "mlp"\nhidden = [32]\n[rule.gim]\nnum_negatives = 8\n'

    status = cli.main(["compare", "--rules", "gim", "--out", str(tmp_path / "out"),
                       "--config", str(_write_config(tmp_path, text))])

    assert status == 2
    err = capsys.readouterr().err
    assert "gim predicts rows of a feature map" in err
    assert "[rule.gim]" not in err


def test_table_value_blamed_before_network(tmp_path, capsys):
    # gim checks num_negatives before the network, which it would also reject.
    text = '[model]\nname = "mlp"\nhidden = [32]\n[rule.gim]\nnum_negatives = 0\n'

    status = cli.main(["compare", "--rules", "gim", "--out", str(tmp_path / "out"),
                       "--config", str(_write_config(tmp_path, text))])

    assert status == 2
    config_path = tmp_path / "config.toml"
    assert f"{config_path}: [rule.gim]: num_negatives must be a positive integer" in (
        capsys.readouterr().err
    )


def test_seed_count_from_numpy():
    assert config.seed_list(np.int64(3)) == (0, 1, 2)


def test_bad_hyperparameter_value_rejected(tmp_path, capsys):
    status = _compare_with_config(tmp_path, 'rules = ["fa"]\n[rule.fa]\nfeedback_scale = -1.0\n')

    assert status == 2
    config_path = tmp_path / "config.toml"
    assert f"{config_path}: [rule.fa]: feedback_scale must be a positive number, got -1.0" in (
        capsys.readouterr().err
    )


def test_out_is_a_file_rejected(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")

    status = cli.main(["compare", "--rules", "bp", "--epochs", "1", "--out", str(target)])

    assert status == 2
    assert "is an existing file" in capsys.readouterr().err


def test_out_inside_a_file_rejected(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")

    status = cli.main(["compare", "--rules", "bp", "--epochs", "1", "--out", str(target / "sub")])

    assert status == 2
    assert "which is a file, not a folder" in capsys.readouterr().err


def test_bench_subcommand_runs_the_benchmark(tmp_path, capsys):
    out = tmp_path / "bench"
    arguments = [
        "bench", "--workloads", "W1", "--rules", "bp", "--steps", "2", "--rounds", "1",
        "--warmup", "0", "--batch-size", "4", "--no-peers", "--seeds", "2", "--es-population",
        "4", "--local-batch", "0", "--ntk-examples", "0", "--matmul-size", "64", "--epochs", "0",
        "--quiet", "--out", str(out),
    ]
    assert cli.main(arguments) == 0
    recorded = json.loads(out.with_suffix(".json").read_text())
    assert recorded["command"] == "bpalt " + " ".join(arguments)
    assert [row["name"] for row in recorded["workloads"]["W1"]["steps"]["rows"]][:2] == [
        "jax.grad + optax", "bp"
    ]


def test_bench_subcommand_bad_input(capsys):
    assert cli.main(["bench", "--workloads", "W9"]) == 2
    assert "unknown workload 'W9'" in capsys.readouterr().err


def test_bench_subcommand_missing_data_dir(tmp_path, capsys):
    arguments = ["bench", "--workloads", "W2", "--data-dir", str(tmp_path / "missing")]
    assert cli.main(arguments) == 2
    assert "data directory not found" in capsys.readouterr().err


def _folder(tmp):
    return tmp


def _inside_a_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file" / "bench"


def _markdown_is_a_folder(tmp):
    (tmp / "bench.md").mkdir()
    return tmp / "bench"


@pytest.mark.parametrize(
    "make_out, message",
    [
        (_folder, "is a folder, but it names the output files"),
        (_inside_a_file, "which is a file, not a folder"),
        (_markdown_is_a_folder, "bench.md, which is a folder"),
    ],
)
def test_bench_bad_out_rejected_early(make_out, message, tmp_path, capsys):
    out = make_out(tmp_path)

    assert cli.main(["bench", "--workloads", "W1", "--out", str(out)]) == 2

    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("budget", ["0", "-1", "nan", "inf"])
def test_bench_bad_seeds_budget(budget, capsys):
    assert cli.main(["bench", "--workloads", "W1", f"--seeds-budget={budget}"]) == 2
    assert f"--seeds-budget must be a positive number of seconds, got {budget}" in (
        capsys.readouterr().err
    )


def test_blas_limited_to_one_thread():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    limiter = cli.limit_blas_threads()
    try:
        pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        assert pools, "NumPy loads a BLAS library, so at least one pool is expected"
        assert {p["num_threads"] for p in pools} == {1}
    finally:
        limiter.restore_original_limits()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--matmul-size", "99999999"], "--matmul-size must be at most 8192"),
        (["--steps", "2", "--rounds", "3"], "--rounds 3 is more than --steps 2"),
        (["--es-population", "3"], "--es-population must be an even integer >= 2"),
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir is not used by workload(s) W1"),
        (["--epoch-rules", "bp,,fa"], "expected comma-separated names, got 'bp,,fa'"),
    ],
)
def test_bench_bad_values_rejected(arguments, message, capsys):
    try:
        status = cli.main(["bench", "--workloads", "W1", *arguments])
    except SystemExit as exit_:  # argparse's own errors exit with the same status
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_bench_unwritable_out_rejected(tmp_path, capsys, unwritable_folders):

    assert cli.main(["bench", "--workloads", "W1", "--out", str(tmp_path / "bench")]) == 2

    assert f"--out {tmp_path / 'bench'}: cannot create files in {tmp_path} (Permission " \
        "denied)" in capsys.readouterr().err


def test_compare_unwritable_out_rejected(tmp_path, capsys, unwritable_folders):

    status = cli.main(["compare", "--rules", "bp", "--out", str(tmp_path / "run")])

    assert status == 2
    assert "cannot create files in" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bench_keeps_results_on_write_failure(tmp_path, monkeypatch, capsys):
    from bpalt import bench

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bench, "write_results", fail)
    monkeypatch.setattr(bench.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    arguments = [
        "bench", "--workloads", "W1", "--rules", "bp", "--steps", "2", "--rounds", "1",
        "--warmup", "0", "--batch-size", "4", "--no-peers", "--seed-rules", "",
        "--epoch-rules", "", "--local-batch", "0", "--ntk-examples", "0", "--matmul-size",
        "64", "--quiet", "--out", str(tmp_path / "bench"),
    ]

    assert cli.main(arguments) == 1

    err = capsys.readouterr().err
    rescued = list(tmp_path.glob("bpalt-bench-*.json"))
    assert len(rescued) == 1
    assert f"the measurements are in {rescued[0]}" in err
    rows = json.loads(rescued[0].read_text())["workloads"]["W1"]["steps"]["rows"]
    assert [row["name"] for row in rows][:2] == ["jax.grad + optax", "bp"]


def test_empty_out_rejected(capsys):
    assert cli.main(["compare", "--rules", "bp", "--out", ""]) == 2
    assert "--out is empty; name a folder" in capsys.readouterr().err


def test_seed_count_capped(capsys):
    assert cli.main(["compare", "--rules", "bp", "--seeds", "99999999999"]) == 2
    assert "at most 1000 seeds per rule, got 99999999999" in capsys.readouterr().err


def test_file_value_checked_under_override(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('epochs = "ten"\n')

    status = cli.main(["compare", "--config", str(config), "--epochs", "1"])

    assert status == 2
    assert f"{config}: epochs must be a positive integer, got 'ten'" in capsys.readouterr().err


def test_model_list_given_as_string(tmp_path, capsys):
    status = _compare_with_config(tmp_path, '[model]\nname = "digits_cnn"\nchannels = "16"\n')

    assert status == 2
    assert "[model] channels must be a list of integers, got '16'" in capsys.readouterr().err


def test_model_missing_setting_named(tmp_path, capsys):
    status = _compare_with_config(tmp_path, '[model]\nname = "mlp"\n')

    assert status == 2
    assert (
        "model 'mlp' needs the [model] setting(s) hidden in the config file (the arguments of "
        "bpalt.models.mlp), e.g. hidden = [256, 128]" in capsys.readouterr().err
    )


def test_model_setting_out_of_range(tmp_path, capsys):
    status = _compare_with_config(tmp_path, '[model]\nname = "digits_cnn"\nchannels = [0]\n')

    assert status == 2
    assert (
        "model 'digits_cnn' with [model] settings {'channels': [0]} does not build for input "
        "shape (8, 8, 1): conv2d features must be a positive integer, got 0"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (
            '[model]\nname = "mlp"\nhidden = [true]\n',
            ["dense features must be a positive integer, got True"],
        ),
        # 64 x 10^11 + 10^11 x 10 weights: far beyond any machine's memory. Only the shapes
        # are traced, so this fails at once instead of stalling in allocation.
        (
            '[model]\nname = "mlp"\nhidden = [100000000000]\n',
            [
                "has 7,500,000,000,010 parameters and a largest activation of",
                "training 3 seed(s) of rule ",
                "with adam needs at least",
                "Use smaller widths, a smaller batch or fewer seeds",
            ],
        ),
        # Few parameters, but the second layer's patch matrix at batch 64 is
        # 64 x 4 x 4 x (9 x 400000) floats: 13.73 GiB, kept with its gradient by 3 seeds.
        (
            '[model]\nname = "digits_cnn"\nchannels = [400000, 1]\n',
            ["has 7,600,051 parameters and a largest activation of 13.73 GiB at batch 64"],
        ),
        # Batch 128 runs in 4 chunks of 32, and all four chunks' arrays count: the same patch
        # matrix at 128 x 4 x 4 x (9 x 100000) floats is 6.87 GiB (1.72 GiB for one chunk).
        (
            'batch_size = 128\n[model]\nname = "digits_cnn"\nchannels = [100000, 1]\n',
            ["largest activation of 6.87 GiB at batch 128"],
        ),
        # The default rules list random_features, the baseline of hsic and gim, before them.
        (
            '[model]\nname = "mlp"\nhidden = []\n',
            [
                "rule 'random_features' needs a network of at least 2 blocks",
                "(random_features runs as the baseline of hsic, gim)",
            ],
        ),
    ],
)
def test_model_config_rejected(tmp_path, capsys, text, messages):
    status = _compare_with_config(tmp_path, text)

    assert status == 2
    error = capsys.readouterr().err
    for message in messages:
        assert message in error
    assert not (tmp_path / "out").exists()


class _Exit(Exception):
    pass


@pytest.mark.parametrize(("status", "way"), [(130, "_exit"), (0, "exit"), (2, "exit")])
def test_entry_exit_after_interrupt(monkeypatch, status, way):
    calls = []

    def record(name):
        def exit_(code):
            calls.append((name, code))
            raise _Exit

        return exit_

    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(argtypes.os, "_exit", record("_exit"))
    monkeypatch.setattr(argtypes.sys, "exit", record("exit"))
    monkeypatch.setattr(argtypes.logging, "shutdown", lambda: None)

    with pytest.raises(_Exit):
        cli.entry()

    assert calls == [(way, status)]


def test_model_class_count_mismatch(tmp_path, capsys):
    status = _compare_with_config(tmp_path, '[model]\nname = "digits_cnn"\nnum_classes = 5\n')

    assert status == 2
    assert "dataset 'digits' has 10 classes but the network outputs shape (5,)" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_dangling_symlink_out_rejected(tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")

    assert cli.main(["compare", "--rules", "bp", "--out", str(link)]) == 2
    assert f"is a symbolic link to {tmp_path / 'missing'}, which does not exist" in (
        capsys.readouterr().err
    )


def test_table_unwritable_folder_rejected(tmp_path, capsys, unwritable_folders):

    assert cli.main(["table", str(tmp_path)]) == 2
    assert f"results folder {tmp_path}: cannot create files in {tmp_path}" in (
        capsys.readouterr().err
    )


def test_write_error_names_the_file(tmp_path, unwritable_folders):
    from bpalt import checkpoint


    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'summary.md'}: Permission"):
        checkpoint.write_atomic(tmp_path / "summary.md", "text")


def test_memory_limit_reads_ulimit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (2**30, resource.RLIM_INFINITY))
    assert config.memory_limit() == (2**30, "address-space limit (ulimit -v)")
