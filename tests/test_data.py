"""Tests for bpalt.data: digits, IDX and CIFAR-10 loaders, and their error messages."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from bpalt import data

# Real MNIST test set outside the repository: the folder named by BPALT_MNIST_DIR, else
# shared/data/mnist beside the clone. Tests that need it skip when the default folder lacks
# the files, and fail when a folder named by BPALT_MNIST_DIR does, since a mistyped path
# would otherwise pass unnoticed as two skips.
# An empty or blank value counts as unset.
MNIST_DIR_NAMED = bool(os.environ.get("BPALT_MNIST_DIR", "").strip())
MNIST_DIR = Path(
    os.path.expanduser(os.environ["BPALT_MNIST_DIR"].strip())
    if MNIST_DIR_NAMED
    else Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------------------
# File writers in the exact on-disk formats
# ---------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as IDX: magic 0x000008DD, one big-endian uint32 per dimension."""
    if magic is None:
        magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed with a .gz suffix if ``compress``."""
    payload = idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def to_bytes(images: np.ndarray) -> np.ndarray:
    """Recover the uint8 pixel values from images scaled to [0, 1]."""
    return np.rint(images * 255.0).astype(np.uint8)


def random_images(rng: np.random.Generator, n: int, height: int = 4, width: int = 3):
    return rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)


def random_labels(rng: np.random.Generator, n: int):
    return rng.integers(0, 10, size=n, dtype=np.uint8)


def write_idx_dataset(directory: Path, compress: bool = False, n_train=12, n_test=7, seed=0):
    """Write the four standard IDX files and return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": random_images(rng, n_train),
        "train_labels": random_labels(rng, n_train),
        "test_images": random_images(rng, n_test),
        "test_labels": random_labels(rng, n_test),
    }
    for key, array in arrays.items():
        write_idx(directory / IDX_FILES[key], array, compress=compress)
    return arrays


def cifar_bytes(images_chw: np.ndarray, labels: np.ndarray) -> bytes:
    """Encode CIFAR-10 records: 1 label byte, then the R, G and B 32x32 planes."""
    records = [
        bytes([int(label)]) + np.ascontiguousarray(image, dtype=np.uint8).tobytes()
        for image, label in zip(images_chw, labels, strict=True)
    ]
    return b"".join(records)


def write_cifar_dataset(directory: Path, per_batch: int = 3, seed: int = 0):
    """Write the six CIFAR-10 batch files and return channels-first images and labels."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for file in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch, dtype=np.uint8)
        (directory / file).write_bytes(cifar_bytes(images, labels))
        written[file] = (images, labels)
    return written


# ---------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


def test_digits_shapes_and_dtypes(digits):
    assert digits.name == "digits"
    assert digits.x_train.shape == (1437, 8, 8, 1)
    assert digits.x_test.shape == (360, 8, 8, 1)
    assert digits.y_train.shape == (1437,)
    assert digits.y_test.shape == (360,)
    assert digits.x_train.dtype == np.float32
    assert digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int32
    assert digits.y_test.dtype == np.int32
    assert digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)


def test_digits_value_range(digits):
    for images in (digits.x_train, digits.x_test):
        assert images.min() == 0.0
        assert images.max() == 1.0
    # Pixels are 0..16 scaled by 1/16, so every value is a multiple of 1/16.
    np.testing.assert_array_equal(digits.x_train * 16, np.round(digits.x_train * 16))


def test_digits_split_is_stratified(digits):
    train_counts = np.bincount(digits.y_train, minlength=10)
    test_counts = np.bincount(digits.y_test, minlength=10)
    total = train_counts + test_counts
    expected_test = total * 360 / 1797

    assert np.all(np.abs(test_counts - expected_test) <= 1), (test_counts, expected_test)
    assert np.all(test_counts > 0)


def test_digits_deterministic(digits):
    again = data.load("digits")
    np.testing.assert_array_equal(digits.x_train, again.x_train)
    np.testing.assert_array_equal(digits.y_train, again.y_train)
    np.testing.assert_array_equal(digits.x_test, again.x_test)
    np.testing.assert_array_equal(digits.y_test, again.y_test)


def test_digits_ignores_data_dir(tmp_path):
    dataset = data.load("digits", data_dir=tmp_path / "does-not-exist")
    assert dataset.x_train.shape == (1437, 8, 8, 1)


def test_digits_matches_sklearn_pixels(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    all_images = np.concatenate([digits.x_train, digits.x_test])[..., 0]
    assert len(all_images) == len(bunch.images)
    # The split only reorders the images, so the sorted per-image pixel sums agree.
    np.testing.assert_allclose(
        np.sort(all_images.sum(axis=(1, 2))), np.sort(bunch.images.sum(axis=(1, 2)) / 16)
    )


# ---------------------------------------------------------------------------
# read_idx and load_idx on written files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    images_path = write_idx(tmp_path / "images", images, compress=compress)
    labels_path = write_idx(tmp_path / "labels", labels, compress=compress)

    read_images = data.read_idx(images_path)
    read_labels = data.read_idx(labels_path)

    assert read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    read_images[0, 0, 0] = 255  # the result is writable


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_idx_exact_content(tmp_path, compress):
    arrays = write_idx_dataset(tmp_path, compress=compress)

    dataset = data.load("mnist", tmp_path)

    assert dataset.name == "mnist"
    assert dataset.num_classes == 10
    assert dataset.input_shape == (4, 3, 1)
    assert dataset.x_train.dtype == np.float32
    assert dataset.y_train.dtype == np.int32
    np.testing.assert_array_equal(to_bytes(dataset.x_train[..., 0]), arrays["train_images"])
    np.testing.assert_array_equal(dataset.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(to_bytes(dataset.x_test[..., 0]), arrays["test_images"])
    np.testing.assert_array_equal(dataset.y_test, arrays["test_labels"])


@pytest.mark.parametrize("name", ["fashion_mnist", "kmnist", "Fashion-MNIST"])
def test_load_idx_family_names(tmp_path, name):
    write_idx_dataset(tmp_path)
    dataset = data.load(name, tmp_path)
    assert dataset.name == name.lower().replace("-", "_")
    assert len(dataset.x_train) == 12
    assert len(dataset.x_test) == 7


def test_load_idx_prefers_raw_over_gzip(tmp_path):
    raw = write_idx_dataset(tmp_path, compress=False, seed=1)
    write_idx_dataset(tmp_path, compress=True, seed=2)

    dataset = data.load_idx(tmp_path)

    np.testing.assert_array_equal(dataset.y_train, raw["train_labels"])


def test_load_idx_mixed_raw_and_gzip(tmp_path):
    arrays = write_idx_dataset(tmp_path, compress=False)
    (tmp_path / IDX_FILES["test_labels"]).unlink()
    write_idx(tmp_path / IDX_FILES["test_labels"], arrays["test_labels"], compress=True)

    dataset = data.load_idx(tmp_path)

    np.testing.assert_array_equal(dataset.y_test, arrays["test_labels"])


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_t10k_split_sizes(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = random_images(rng, 10_000, height=2, width=2)
    labels = random_labels(rng, 10_000)
    write_idx(tmp_path / IDX_FILES["test_images"], images, compress=compress)
    write_idx(tmp_path / IDX_FILES["test_labels"], labels, compress=compress)

    dataset = data.load("kmnist_t10k", tmp_path)

    assert dataset.name == "kmnist_t10k"
    assert dataset.x_train.shape == (8000, 2, 2, 1)
    assert dataset.x_test.shape == (2000, 2, 2, 1)
    np.testing.assert_array_equal(dataset.y_train, labels[:8000])
    np.testing.assert_array_equal(dataset.y_test, labels[8000:])
    np.testing.assert_array_equal(to_bytes(dataset.x_test[-1, ..., 0]), images[-1])


def test_t10k_too_few_images(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / IDX_FILES["test_images"], random_images(rng, 5))
    write_idx(tmp_path / IDX_FILES["test_labels"], random_labels(rng, 5))

    with pytest.raises(ValueError, match=r"cannot split 5 images .* 8000 for training"):
        data.load("mnist_t10k", tmp_path)


# ---------------------------------------------------------------------------
# IDX errors
# ---------------------------------------------------------------------------


def test_idx_truncated_file(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:-5])

    # The header is 16 bytes and the data 48 bytes, so 64 are expected and 59 present.
    with pytest.raises(ValueError, match=r"images: truncated, expected 64 bytes .* found 59"):
        data.read_idx(path)


def test_idx_truncated_gzip_file(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8)))[:-12])

    with pytest.raises(ValueError, match=r"images\.gz: gzip decompression failed"):
        data.read_idx(path)


def test_idx_truncated_content_in_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))[:-5]))

    with pytest.raises(ValueError, match=r"truncated, expected 64 bytes .* found 59 bytes "
                       r"after decompression"):
        data.read_idx(path)


def test_idx_too_long_file(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)) + b"\x00")

    with pytest.raises(ValueError, match=r"too long, expected 11 bytes .* found 12"):
        data.read_idx(path)


def test_idx_implausible_sizes(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">4I", 0x0803, *(3 * [2**32 - 1])))

    with pytest.raises(ValueError) as info:
        data.read_idx(path)

    # 16 header bytes plus (2**32 - 1)**3 data bytes, which overflows int64.
    message = str(info.value)
    sizes = "(4294967295, 4294967295, 4294967295)"
    assert (
        f"images: damaged header, because its dimension sizes {sizes} imply a file of "
        f"{16 + (2**32 - 1) ** 3} bytes"
    ) in message
    assert "79228162458924105385300197391 bytes" in message
    assert "but the file has 16 bytes. Replace the file with an intact copy" in message


def test_idx_truncated_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">II", 0x0803, 10))

    with pytest.raises(ValueError, match=r"truncated header, expected 16 bytes .* found 8"):
        data.read_idx(path)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8), magic=0x12340803))

    with pytest.raises(ValueError, match=r"images: wrong magic number 0x12340803"):
        data.read_idx(path)


def test_idx_unsupported_type(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8), magic=0x0D01))

    with pytest.raises(ValueError, match=r"data type 0x0D \(float32\).*only 0x08"):
        data.read_idx(path)


def test_idx_wrong_dimension_count(tmp_path):
    arrays = write_idx_dataset(tmp_path)
    # A labels file that stores images: magic 0x00000803 where 0x00000801 is expected.
    write_idx(tmp_path / IDX_FILES["train_labels"], arrays["train_images"])

    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: .* declares 3 dimensions, "
                       r"expected 1, i\.e\. 0x00000801"):
        data.load_idx(tmp_path)


def test_idx_label_out_of_range(tmp_path):
    arrays = write_idx_dataset(tmp_path)
    labels = arrays["test_labels"].copy()
    labels[4] = 12
    write_idx(tmp_path / IDX_FILES["test_labels"], labels)

    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: label 12 at index 4 "
                       r"is out of range, expected 0\.\.9"):
        data.load_idx(tmp_path)


def test_idx_count_mismatch(tmp_path):
    arrays = write_idx_dataset(tmp_path)
    write_idx(tmp_path / IDX_FILES["train_labels"], arrays["train_labels"][:-1])

    with pytest.raises(ValueError, match=r"count mismatch: .*train-images-idx3-ubyte has 12 "
                       r"images but .*train-labels-idx1-ubyte has 11 labels"):
        data.load_idx(tmp_path)


def test_idx_missing_file(tmp_path):
    write_idx_dataset(tmp_path)
    (tmp_path / IDX_FILES["train_images"]).unlink()

    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", tmp_path)

    message = str(info.value)
    assert "train-images-idx3-ubyte[.gz] not found" in message
    assert str(tmp_path) in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "mnist_t10k" in message


def test_idx_missing_t10k_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\[\.gz\], "
                       r"t10k-labels-idx1-ubyte\[\.gz\] not found in"):
        data.load("fashion_mnist_t10k", tmp_path)


def test_idx_file_path_is_a_folder(tmp_path):
    write_idx_dataset(tmp_path)
    folder = tmp_path / IDX_FILES["train_labels"]
    folder.unlink()
    folder.mkdir()

    with pytest.raises(FileNotFoundError) as info:
        data.load("mnist", tmp_path)

    assert str(info.value) == (
        f"dataset 'mnist': {folder} is a folder, but an IDX file is expected there; "
        "move each folder away and put the file in its place"
    )


def test_cifar10_file_path_is_a_folder(tmp_path):
    write_cifar_dataset(tmp_path)
    folder = tmp_path / "test_batch.bin"
    folder.unlink()
    folder.mkdir()

    with pytest.raises(FileNotFoundError, match=r"test_batch\.bin is a folder, but a "
                       r"CIFAR-10 binary batch file is expected there"):
        data.load("cifar10", tmp_path)


@pytest.mark.parametrize("blank", ["", " "])
@pytest.mark.parametrize("name", ["mnist", "kmnist_t10k", "cifar10"])
def test_blank_data_dir(tmp_path, monkeypatch, name, blank):
    # The current folder contains a complete dataset, which a blank string must not load.
    write_idx_dataset(tmp_path)
    write_cifar_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValueError) as info:
        data.load(name, blank)

    assert str(info.value) == (
        f"data directory {blank!r} is blank; pass --data-dir (data_dir=...) with the "
        "folder that contains the dataset files"
    )


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=r"data directory not found: .*no-such-dir"):
        data.load("mnist", missing)


def test_directory_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"is a file, expected a directory"):
        data.load("cifar10", path)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'; expected one of: digits, "
                       r"mnist, .*cifar10"):
        data.load("svhn", "/tmp")


def test_data_dir_required():
    for name in data.DATASETS:
        if name == "digits":
            continue
        with pytest.raises(ValueError, match=r"needs a data directory: pass --data-dir"):
            data.load(name)


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("subfolder", [False, True], ids=["flat", "subfolder"])
def test_cifar10_exact_content(tmp_path, subfolder):
    batch_dir = tmp_path / data.CIFAR10_SUBFOLDER if subfolder else tmp_path
    written = write_cifar_dataset(batch_dir)

    dataset = data.load("cifar10", tmp_path)

    assert dataset.name == "cifar10"
    assert dataset.num_classes == 10
    assert dataset.input_shape == (32, 32, 3)
    assert dataset.x_train.shape == (15, 32, 32, 3)
    assert dataset.x_test.shape == (3, 32, 32, 3)
    assert dataset.x_train.dtype == np.float32
    assert dataset.y_train.dtype == np.int32

    train_images = np.concatenate([written[f][0] for f in data.CIFAR10_TRAIN_FILES])
    train_labels = np.concatenate([written[f][1] for f in data.CIFAR10_TRAIN_FILES])
    np.testing.assert_array_equal(dataset.y_train, train_labels)
    np.testing.assert_array_equal(to_bytes(dataset.x_train), train_images.transpose(0, 2, 3, 1))
    test_images, test_labels = written[data.CIFAR10_TEST_FILE]
    np.testing.assert_array_equal(dataset.y_test, test_labels)
    np.testing.assert_array_equal(to_bytes(dataset.x_test), test_images.transpose(0, 2, 3, 1))


def test_cifar10_channel_layout(tmp_path):
    # One image whose R plane is 10, G plane 20 and B plane 30, plus a marked pixel (row 1,
    # column 2) in the red plane: NHWC must put it at [1, 2, 0].
    image = np.stack([np.full((32, 32), v, dtype=np.uint8) for v in (10, 20, 30)])
    image[0, 1, 2] = 200
    write_cifar_dataset(tmp_path, per_batch=1)
    (tmp_path / data.CIFAR10_TEST_FILE).write_bytes(cifar_bytes(image[None], np.array([7])))

    dataset = data.load_cifar10(tmp_path)

    pixels = np.round(dataset.x_test[0] * 255).astype(int)
    assert dataset.y_test.tolist() == [7]
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[1, 2].tolist() == [200, 20, 30]
    assert pixels[2, 1].tolist() == [10, 20, 30]


def test_cifar10_bad_length(tmp_path):
    write_cifar_dataset(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ValueError, match=r"data_batch_3\.bin: length 9119 bytes is not a "
                       r"positive multiple of the 3073-byte record size"):
        data.load_cifar10(tmp_path)


def test_cifar10_label_out_of_range(tmp_path):
    write_cifar_dataset(tmp_path)
    path = tmp_path / "test_batch.bin"
    records = bytearray(path.read_bytes())
    records[3073] = 10  # label byte of the second record
    path.write_bytes(bytes(records))

    with pytest.raises(ValueError, match=r"test_batch\.bin: label 10 at index 1 is out of "
                       r"range"):
        data.load_cifar10(tmp_path)


def test_cifar10_missing_file(tmp_path):
    write_cifar_dataset(tmp_path)
    (tmp_path / "data_batch_5.bin").unlink()

    with pytest.raises(FileNotFoundError, match=r"missing in .*: data_batch_5\.bin\."):
        data.load("cifar10", tmp_path)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def tiny_dataset(**overrides) -> data.Dataset:
    fields = dict(
        name="tiny",
        x_train=np.zeros((2, 2, 2, 1), dtype=np.float32),
        y_train=np.array([0, 1], dtype=np.int32),
        x_test=np.zeros((1, 2, 2, 1), dtype=np.float32),
        y_test=np.array([1], dtype=np.int32),
        num_classes=2,
    )
    fields.update(overrides)
    return data.Dataset(**fields)


def test_check_dataset_accepts_valid():
    dataset = tiny_dataset()
    assert data.check_dataset(dataset) is dataset


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_check_dataset_rejects_non_finite(bad_value):
    x_train = np.zeros((2, 2, 2, 1), dtype=np.float32)
    x_train[1, 0, 1, 0] = bad_value
    with pytest.raises(ValueError, match=r"train split: non-finite pixel value .* at index "
                       r"\(1, 0, 1, 0\)"):
        data.check_dataset(tiny_dataset(x_train=x_train))


def test_check_dataset_rejects_out_of_unit_range():
    x_test = np.full((1, 2, 2, 1), 2.0, dtype=np.float32)
    with pytest.raises(ValueError, match=r"test split: pixel values must be in \[0, 1\]"):
        data.check_dataset(tiny_dataset(x_test=x_test))


def test_check_dataset_rejects_bad_label():
    with pytest.raises(ValueError, match=r"test split: label 5 at index 0 is out of range, "
                       r"expected 0\.\.1"):
        data.check_dataset(tiny_dataset(y_test=np.array([5], dtype=np.int32)))


def test_check_input_shape_match_and_mismatch(digits):
    data.check_input_shape(digits, (8, 8, 1))
    data.check_input_shape((28, 28, 1), [28, 28, 1])

    with pytest.raises(ValueError, match=r"dataset 'digits' has input shape \(8, 8, 1\) but "
                       r"the network expects \(28, 28, 1\); build the network"):
        data.check_input_shape(digits, (28, 28, 1))


# ---------------------------------------------------------------------------
# Real MNIST test set
# ---------------------------------------------------------------------------


def real_mnist_file(key: str) -> Path | None:
    """Return the real MNIST file ``key`` in ``MNIST_DIR``, or None.

    The raw file comes before its ``.gz`` copy, as in ``data.load``, so that every test
    reads the same bytes.
    """
    for name in (IDX_FILES[key], f"{IDX_FILES[key]}.gz"):
        if (MNIST_DIR / name).is_file():
            return MNIST_DIR / name
    return None


def require_real_mnist() -> Path:
    """Return ``MNIST_DIR``, or skip or fail (see ``MNIST_DIR``) when it lacks the t10k files."""
    missing = [
        f"{IDX_FILES[key]}[.gz]"
        for key in ("test_images", "test_labels")
        if real_mnist_file(key) is None
    ]
    if missing:
        found = "folder not found" if not MNIST_DIR.is_dir() else f"missing {', '.join(missing)}"
        expected = (
            "the folder that contains t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
            "(gzipped or not)"
        )
        if MNIST_DIR_NAMED:
            pytest.fail(
                f"BPALT_MNIST_DIR={str(MNIST_DIR)!r}: {found}. Set it to {expected}, or unset "
                "it to skip these tests"
            )
        pytest.skip(
            f"real MNIST t10k files not found in {MNIST_DIR} ({found}); set BPALT_MNIST_DIR "
            f"to {expected}"
        )
    return MNIST_DIR


def test_real_mnist_t10k_statistics():
    require_real_mnist()
    images = data.read_idx(real_mnist_file("test_images"), ndim=3)
    labels = data.read_idx(real_mnist_file("test_labels"), ndim=1)

    assert images.shape == (10_000, 28, 28)
    assert labels.shape == (10_000,)
    scaled = images / 255.0
    assert scaled.mean() == pytest.approx(0.1325, abs=1e-3)
    assert scaled.std() == pytest.approx(0.3105, abs=1e-3)
    expected_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(labels, minlength=10).tolist() == expected_counts


def test_real_mnist_t10k_split():
    directory = require_real_mnist()
    dataset = data.load("mnist_t10k", directory)

    assert dataset.x_train.shape == (8000, 28, 28, 1)
    assert dataset.x_test.shape == (2000, 28, 28, 1)
    assert dataset.y_train.shape == (8000,)
    assert dataset.y_test.shape == (2000,)
    assert dataset.input_shape == (28, 28, 1)
    all_images = np.concatenate([dataset.x_train, dataset.x_test])
    assert float(all_images.mean()) == pytest.approx(0.1325, abs=1e-3)
