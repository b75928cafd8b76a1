"""Small versions of the textbook studies: symmetry, vanishing and exploding gradients.

Also the ``python -m bpalt.studies`` command line: its start and its ``--out`` checks.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bpalt import studies

# Depth study arguments that finish in seconds, should a test reach the study by mistake.
QUICK_DEPTH = ["depth", "--max-depth", "2", "--seeds", "1"]

SMALL_SETTINGS = studies.InitStudySettings(
    mlp_depth=3,
    mlp_width=8,
    cnn_channels=(2, 3),
    epochs=2,
    batch_size=64,
    learning_rate=0.05,
    seeds=1,
    gradient_batch=64,
)


@pytest.fixture(scope="module")
def mlp_rows(digits):
    return studies.init_study(
        architectures=("mlp",),
        activations=("sigmoid", "relu"),
        inits=("zeros", "he"),
        settings=SMALL_SETTINGS,
        dataset=digits,
    )


def _row(rows, activation, init):
    (row,) = [r for r in rows if r["activation"] == activation and r["init"] == init]
    return row


def test_init_study_rows_have_documented_columns(mlp_rows):
    assert len(mlp_rows) == 4
    for row in mlp_rows:
        assert tuple(row) == studies.INIT_COLUMNS


def test_zero_init_hidden_units_stay_identical(mlp_rows):
    row = _row(mlp_rows, "sigmoid", "zeros")

    assert row["distinct_units"] == (1, 1)
    assert row["unit_spread"] < 1e-6


def test_he_init_hidden_units_all_distinct(mlp_rows):
    row = _row(mlp_rows, "sigmoid", "he")

    assert row["distinct_units"] == (8, 8)
    assert row["unit_spread"] > 0.1


def test_zero_init_relu_first_layer_gets_no_gradient(mlp_rows):
    row = _row(mlp_rows, "relu", "zeros")

    assert row["grad_norm_first"] == 0.0
    assert row["grad_norm_last"] > 0.0
    assert row["grad_ratio"] == 0.0


def test_zero_init_cnn_sigmoid_unit_counts(digits):
    # The CNN's output layer stays randomly initialised, so the second convolution's 3
    # channels get different errors; the first one's 2 channels get identical errors.
    (row,) = studies.init_study(
        architectures=("cnn",),
        activations=("sigmoid",),
        inits=("zeros",),
        settings=SMALL_SETTINGS,
        dataset=digits,
    )

    assert row["distinct_units"] == (1, 3)


def test_count_distinct_units_dense_and_conv():
    dense = {"w": np.array([[1.0, 1.0, 2.0], [0.5, 0.5, 0.5]]), "b": np.zeros(3)}
    assert studies.count_distinct_units(dense) == 2

    dense_bias = {"w": dense["w"], "b": np.array([0.0, 0.3, 0.0])}
    assert studies.count_distinct_units(dense_bias) == 3

    kernel = np.random.default_rng(0).normal(size=(2, 2, 1, 3))
    kernel[..., 2] = kernel[..., 0]
    assert studies.count_distinct_units({"w": kernel}) == 2


def test_unit_spread_hand_computed():
    # Units (0, 0) and (2, 0): mean (1, 0), both at distance 1.
    layer = {"w": np.array([[0.0, 2.0]]), "b": np.zeros(2)}

    assert studies.unit_spread(layer) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def depth_rows(digits):
    return studies.depth_study(
        depths=(2, 8),
        activations=("sigmoid", "relu"),
        inits=("standard", "normal(1.0)"),
        width=16,
        seeds=2,
        batch_size=64,
        dataset=digits,
    )


def _depth_norms(rows, activation, init):
    points = sorted(
        (r["depth"], r) for r in rows if r["activation"] == activation and r["init"] == init
    )
    return {depth: row for depth, row in points}


def test_depth_study_rows_have_documented_columns(depth_rows):
    assert len(depth_rows) == 8
    for row in depth_rows:
        assert tuple(row) == studies.DEPTH_COLUMNS
    assert {r["init"] for r in depth_rows} == {"xavier", "he", "normal(1.0)"}


def test_deep_sigmoid_gradient_vanishes(depth_rows):
    norms = _depth_norms(depth_rows, "sigmoid", "xavier")

    deep = norms[8]
    assert deep["grad_norm_first"] / deep["grad_norm_last"] < 1e-2
    assert norms[8]["grad_norm_first"] < norms[2]["grad_norm_first"] / 10


def test_large_normal_relu_gradient_grows_with_depth(depth_rows):
    norms = _depth_norms(depth_rows, "relu", "normal(1.0)")

    assert norms[8]["grad_norm_first"] > 10 * norms[2]["grad_norm_first"]


def test_he_relu_gradient_stable_with_depth(depth_rows):
    norms = _depth_norms(depth_rows, "relu", "he")

    ratio = norms[8]["grad_norm_first"] / norms[2]["grad_norm_first"]
    assert 0.1 < ratio < 10


def test_depth_study_rejects_bad_depth(digits):
    with pytest.raises(ValueError, match="positive integer"):
        studies.depth_study(depths=(0,), dataset=digits)


def test_result_files_written(tmp_path, mlp_rows, depth_rows):
    init_path = studies.write_init_study(
        tmp_path, "python -m bpalt.studies init", SMALL_SETTINGS, mlp_rows
    )
    depth_path = studies.write_depth_study(
        tmp_path,
        "python -m bpalt.studies depth",
        depth_rows,
        {"width": 16, "seeds": 2, "batch_size": 64},
    )

    init_text = init_path.read_text()
    assert "| mlp " in init_text
    assert "python -m bpalt.studies init" in init_text
    assert "- jax: " in init_text
    depth_text = depth_path.read_text()
    assert "L=8" in depth_text
    assert (tmp_path / "depth_study.png").stat().st_size > 0


def test_build_network_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown architecture"):
        studies.build_network("resnet", "relu", "he")
    with pytest.raises(ValueError, match="unknown init"):
        studies.build_network("mlp", "relu", "orthogonal")


def test_first_and_last_orders_layers_by_position():
    # jax.jit returns dict outputs with string-sorted keys: block10.0 before block2.0.
    norms = {"block0.1": 1.0, "block1.0": 2.0, "block10.0": 11.0, "block2.0": 3.0}

    first, last = studies.first_and_last(norms)

    assert first == 1.0
    assert last == 11.0


def test_module_runs_without_runpy_warning():
    finished = subprocess.run(
        [sys.executable, "-m", "bpalt.studies", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert finished.returncode == 0
    assert "usage: python -m bpalt.studies" in finished.stdout
    assert "RuntimeWarning" not in finished.stderr
    assert finished.stderr == ""


def test_package_still_exposes_studies():
    finished = subprocess.run(
        [sys.executable, "-c", "import bpalt; print(bpalt.studies.ACTIVATIONS)"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "('sigmoid', 'tanh', 'relu')\n"


def test_out_existing_file_is_one_line_error(tmp_path):
    existing = tmp_path / "results"
    existing.write_text("not a folder")

    finished = subprocess.run(
        [sys.executable, "-m", "bpalt.studies", *QUICK_DEPTH, "--out", str(existing)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert finished.returncode == 2
    assert finished.stderr == (
        f"python -m bpalt.studies depth: error: --out {existing} is an existing file; "
        "name a folder\n"
    )
    assert existing.read_text() == "not a folder"


def test_init_out_existing_file_rejected_before_training(tmp_path, capsys, monkeypatch):
    existing = tmp_path / "results"
    existing.write_text("")
    monkeypatch.setattr(studies, "init_study", _fail_if_called)

    status = studies.main(["init", "--out", str(existing)])

    assert status == 2
    assert capsys.readouterr().err == (
        f"python -m bpalt.studies init: error: --out {existing} is an existing file; "
        "name a folder\n"
    )


def test_out_under_a_file_is_one_line_error(tmp_path, capsys, monkeypatch):
    existing = tmp_path / "file"
    existing.write_text("")
    out = existing / "sub" / "results"
    monkeypatch.setattr(studies, "depth_study", _fail_if_called)

    status = studies.main([*QUICK_DEPTH, "--out", str(out)])

    assert status == 2
    assert capsys.readouterr().err == (
        f"python -m bpalt.studies depth: error: --out {out} lies inside {existing}, "
        "which is a file, not a folder\n"
    )


def test_out_result_name_is_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "depth_study.png").mkdir()
    monkeypatch.setattr(studies, "depth_study", _fail_if_called)

    status = studies.main([*QUICK_DEPTH, "--out", str(tmp_path)])

    assert status == 2
    assert capsys.readouterr().err == (
        f"python -m bpalt.studies depth: error: --out {tmp_path} contains a folder named "
        "depth_study.png, where the study writes a file; remove it or name another folder\n"
    )


def test_prepare_output_folder_creates_missing_folders(tmp_path):
    out = tmp_path / "a" / "b"

    assert studies.prepare_output_folder(out, studies.RESULT_FILES["init"]) is None
    assert out.is_dir()


def test_prepare_output_folder_reports_os_error(tmp_path, monkeypatch):
    def deny_mkdir(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", deny_mkdir)
    out = tmp_path / "results"

    problem = studies.prepare_output_folder(out, studies.RESULT_FILES["depth"])

    assert problem == f"cannot create --out {out}: Permission denied"


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the study ran although --out was rejected")


def test_unwritable_out_rejected_before_study(tmp_path, monkeypatch, capsys, unwritable_folders):
    monkeypatch.setattr(studies, "init_study", _fail_if_called)

    status = studies.main(["init", "--out", str(tmp_path)])

    assert status == 2
    assert f"--out {tmp_path}: cannot create files in {tmp_path} (Permission denied)" in (
        capsys.readouterr().err
    )
