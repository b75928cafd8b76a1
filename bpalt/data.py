"""Image classification datasets as NHWC float32 arrays in [0, 1] with int32 labels.

Every loader reads local files only and never downloads anything:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits, the default that needs no files.
- ``mnist``, ``fashion_mnist``, ``kmnist``: the four standard IDX files in a directory.
- ``mnist_t10k``, ``fashion_mnist_t10k``, ``kmnist_t10k``: only the two t10k (test set) IDX
  files, split into the first 8,000 images for training and the rest for testing.
- ``cifar10``: the binary version of CIFAR-10 (``data_batch_1.bin`` .. ``test_batch.bin``).

Each loader validates the file format, the label range and the value range, and raises an
error that names the file or value and what is wrong.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A train/test split of an image classification dataset.

    Images are NHWC float32 in [0, 1] and labels are int32 class indices in
    ``0 .. num_classes - 1``.
    """

    name: str
    x_train: np.ndarray  # (n_train, height, width, channels) float32
    y_train: np.ndarray  # (n_train,) int32
    x_test: np.ndarray  # (n_test, height, width, channels) float32
    y_test: np.ndarray  # (n_test,) int32
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(height, width, channels)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


IDX_DATASETS = ("mnist", "fashion_mnist", "kmnist")
T10K_SUFFIX = "_t10k"
DATASETS: tuple[str, ...] = (
    "digits",
    *IDX_DATASETS,
    *(name + T10K_SUFFIX for name in IDX_DATASETS),
    "cifar10",
)
# The data sets that ``load`` reads from a data directory: all but the bundled digits.
FILE_DATASETS: tuple[str, ...] = tuple(name for name in DATASETS if name != "digits")

# MNIST, Fashion-MNIST and KMNIST all have 10 classes.
IDX_NUM_CLASSES = 10
CIFAR10_NUM_CLASSES = 10

# Split of the 10,000-image t10k files into train and test for the ``*_t10k`` variants.
T10K_NUM_TRAIN = 8000

IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"

CIFAR10_SUBFOLDER = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_IMAGE_SHAPE = (3, 32, 32)  # channels first, as stored in the file
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes

GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_TYPE = 0x08
# Names of the IDX data type codes, used only to make error messages readable.
IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def load(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load the dataset called ``name`` (one of ``DATASETS``).

    ``data_dir`` is the directory that contains the dataset files. It is required for every
    dataset except ``digits``, which is bundled with scikit-learn and ignores it.
    Names are case-insensitive and accept ``-`` for ``_`` (``fashion-mnist``).

    Raises:
        ValueError: unknown name, missing or empty ``data_dir``, or a corrupt file.
        FileNotFoundError: the directory or one of the expected files does not exist, or a
            folder is in place of an expected file.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}"
        )

    if key == "digits":
        return load_digits()

    if data_dir is None:
        raise ValueError(
            f"dataset {key!r} is read from local files, so it needs a data directory: "
            "pass --data-dir (data_dir=...) pointing to the folder that contains its files"
        )

    if key == "cifar10":
        return load_cifar10(data_dir)
    if key.endswith(T10K_SUFFIX):
        return load_idx_t10k(data_dir, name=key)
    return load_idx(data_dir, name=key)


def check_input_shape(
    dataset_or_shape: Dataset | tuple[int, ...],
    network_input_shape: tuple[int, ...],
) -> None:
    """Raise ValueError unless the dataset's image shape equals the network's input shape.

    Both shapes are ``(height, width, channels)``, without the batch dimension.
    """
    if isinstance(dataset_or_shape, Dataset):
        label = f"dataset {dataset_or_shape.name!r}"
        data_shape = dataset_or_shape.input_shape
    else:
        label = "dataset"
        data_shape = tuple(int(d) for d in dataset_or_shape)
    network_shape = tuple(int(d) for d in network_input_shape)

    if data_shape != network_shape:
        raise ValueError(
            f"{label} has input shape {data_shape} but the network expects {network_shape}; "
            f"build the network with input_shape={data_shape} (dataset.input_shape) "
            "or choose a dataset whose images match the network"
        )


def check_dataset(dataset: Dataset) -> Dataset:
    """Validate dtypes, shapes, value range and labels of ``dataset`` and return it unchanged.

    Images must be 4-D float32, finite and in [0, 1]. Labels must be 1-D int32 in
    ``0 .. num_classes - 1``, with one label per image. Raises ValueError naming the problem.
    """
    if dataset.num_classes < 1:
        raise ValueError(f"dataset {dataset.name!r}: num_classes must be >= 1, "
                         f"got {dataset.num_classes}")

    for split in ("train", "test"):
        images = getattr(dataset, f"x_{split}")
        labels = getattr(dataset, f"y_{split}")
        where = f"dataset {dataset.name!r}, {split} split"

        if images.ndim != 4:
            raise ValueError(f"{where}: images must have shape (n, height, width, channels), "
                             f"got shape {images.shape}")
        if images.dtype != np.float32:
            raise ValueError(f"{where}: images must be float32, got {images.dtype}")
        if labels.ndim != 1 or labels.dtype != np.int32:
            raise ValueError(f"{where}: labels must be a 1-D int32 array, "
                             f"got shape {labels.shape} and dtype {labels.dtype}")
        if len(images) != len(labels):
            raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")

        _check_finite_unit_range(images, where)
        _check_label_range(labels, dataset.num_classes, where)

    if dataset.x_train.shape[1:] != dataset.x_test.shape[1:]:
        raise ValueError(f"dataset {dataset.name!r}: train images have shape "
                         f"{dataset.x_train.shape[1:]} but test images have shape "
                         f"{dataset.x_test.shape[1:]}")
    return dataset


# ---------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------


def load_digits() -> Dataset:
    """Load scikit-learn's bundled 8x8 digits (1,797 images) as a fixed 80/20 split.

    Pixels 0..16 are scaled to [0, 1], giving images of shape (n, 8, 8, 1). The split is
    stratified by class with ``random_state=0``, so it is the same on every call:
    1,437 training and 360 test images.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., np.newaxis]
    labels = bunch.target.astype(np.int32)

    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    dataset = Dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)
    return check_dataset(dataset)


# ---------------------------------------------------------------------------
# IDX files: MNIST, Fashion-MNIST, KMNIST
# ---------------------------------------------------------------------------


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes, raw or gzip-compressed, into a uint8 array.

    The IDX header is a big-endian magic number ``0x0000TTDD`` (``TT`` the data type,
    ``DD`` the number of dimensions) followed by one uint32 size per dimension. Only the
    unsigned byte type 0x08 is supported, which MNIST-style image and label files use.
    Compression is detected from the gzip magic bytes, not the file name.

    Args:
        path: the file to read.
        ndim: if given, the required number of dimensions (1 for labels, magic 0x00000801;
            3 for images, magic 0x00000803).

    Returns:
        uint8 array with the shape given in the header, e.g. (n, 28, 28) for images.

    Raises:
        ValueError: the file is not valid IDX, its length does not match the header, or
            the header's sizes are too large for any array.
    """
    path = Path(path)
    data = path.read_bytes()

    # The IDX magic number starts with two zero bytes, so it cannot be mistaken for gzip.
    compressed = data[:2] == GZIP_MAGIC
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"invalid IDX file {path}: gzip decompression failed "
                             f"({error})") from error

    shape = _parse_idx_header(data, path, ndim)
    header_bytes = 4 + 4 * len(shape)
    _check_idx_length(path, shape, len(data), compressed)

    # frombuffer avoids a Python loop per pixel. The copy makes the result writable.
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape).copy()


def _check_idx_length(path: Path, shape: tuple[int, ...], length: int, compressed: bool) -> None:
    """Raise ValueError unless ``length`` equals the header size plus the data size of ``shape``."""
    header_bytes = 4 + 4 * len(shape)
    # math.prod on Python ints, because an int64 product of three sizes near 2**32 overflows.
    expected_bytes = header_bytes + math.prod(shape)
    if length == expected_bytes:
        return

    found = f"{length} bytes after decompression" if compressed else f"{length} bytes"
    if expected_bytes > sys.maxsize:
        raise ValueError(
            f"invalid IDX file {path}: damaged header, because its dimension sizes {shape} "
            f"imply a file of {expected_bytes} bytes, more than the largest possible array "
            f"({sys.maxsize} bytes), but the file has {found}. Replace the file with an "
            "intact copy"
        )
    problem = "truncated" if length < expected_bytes else "too long"
    raise ValueError(
        f"invalid IDX file {path}: {problem}, expected {expected_bytes} bytes "
        f"({header_bytes} header + data of shape {shape} at 1 byte each) but found {found}"
    )


def _parse_idx_header(data: bytes, path: Path, ndim: int | None) -> tuple[int, ...]:
    """Validate the IDX magic number and return the shape stored in the header."""
    if len(data) < 4:
        raise ValueError(f"invalid IDX file {path}: truncated, only {len(data)} bytes, "
                         "expected at least a 4-byte magic number")

    magic = int.from_bytes(data[:4], "big")
    expected_magic = "0x00000801 (labels) or 0x00000803 (images)"
    if ndim is not None:
        expected_magic = f"0x{(IDX_UBYTE_TYPE << 8) | ndim:08X} ({ndim}-D)"

    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"invalid IDX file {path}: wrong magic number 0x{magic:08X}, "
                         f"expected {expected_magic}; the file is not in IDX format")

    type_code, file_ndim = data[2], data[3]
    if type_code != IDX_UBYTE_TYPE:
        type_name = IDX_TYPE_NAMES.get(type_code, "unknown type")
        raise ValueError(f"invalid IDX file {path}: magic number 0x{magic:08X} has data type "
                         f"0x{type_code:02X} ({type_name}), but only 0x08 (unsigned byte) "
                         f"is supported; expected {expected_magic}")
    if file_ndim == 0:
        raise ValueError(f"invalid IDX file {path}: magic number 0x{magic:08X} declares 0 "
                         f"dimensions; expected {expected_magic}")
    if ndim is not None and file_ndim != ndim:
        raise ValueError(f"invalid IDX file {path}: magic number 0x{magic:08X} declares "
                         f"{file_ndim} dimensions, expected {ndim}, i.e. {expected_magic}")

    header_bytes = 4 + 4 * file_ndim
    if len(data) < header_bytes:
        raise ValueError(f"invalid IDX file {path}: truncated header, expected "
                         f"{header_bytes} bytes for {file_ndim} dimensions but found "
                         f"{len(data)} bytes")
    return tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(file_ndim))


def load_idx(directory: str | os.PathLike, name: str = "mnist") -> Dataset:
    """Load an MNIST-style dataset from the four standard IDX files in ``directory``.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or with a ``.gz``
    suffix. ``name`` becomes ``Dataset.name``. Images of shape (n, 28, 28) become
    (n, 28, 28, 1) float32 in [0, 1]; labels must be in 0..9.
    """
    directory = _require_directory(directory)
    paths = _find_idx_files(
        directory,
        name,
        (IDX_TRAIN_IMAGES, IDX_TRAIN_LABELS, IDX_TEST_IMAGES, IDX_TEST_LABELS),
    )

    x_train, y_train = _read_idx_pair(paths[0], paths[1], IDX_NUM_CLASSES)
    x_test, y_test = _read_idx_pair(paths[2], paths[3], IDX_NUM_CLASSES)

    dataset = Dataset(name, x_train, y_train, x_test, y_test, IDX_NUM_CLASSES)
    return check_dataset(dataset)


def load_idx_t10k(
    directory: str | os.PathLike,
    name: str = "mnist_t10k",
    num_train: int = T10K_NUM_TRAIN,
) -> Dataset:
    """Load only the two t10k IDX files of ``directory`` and split them into train and test.

    The first ``num_train`` images (8,000 by default) form the training set and the rest
    the test set, which is 2,000 images for the 10,000-image t10k files of MNIST,
    Fashion-MNIST and KMNIST. This serves machines that only have the test set.
    """
    directory = _require_directory(directory)
    images_path, labels_path = _find_idx_files(
        directory, name, (IDX_TEST_IMAGES, IDX_TEST_LABELS)
    )

    images, labels = _read_idx_pair(images_path, labels_path, IDX_NUM_CLASSES)
    if not 0 < num_train < len(images):
        raise ValueError(f"cannot split {len(images)} images of {images_path} into "
                         f"{num_train} for training and at least one for testing")

    dataset = Dataset(
        name,
        images[:num_train],
        labels[:num_train],
        images[num_train:],
        labels[num_train:],
        IDX_NUM_CLASSES,
    )
    return check_dataset(dataset)


def _find_idx_files(directory: Path, name: str, stems: tuple[str, ...]) -> list[Path]:
    """Return the path of each IDX file stem in ``directory``, raw preferred over ``.gz``.

    Raises FileNotFoundError naming every folder in place of a file, or else listing
    every missing file at once.
    """
    found: list[Path] = []
    missing: list[str] = []
    folders: list[Path] = []
    for stem in stems:
        # The raw file is preferred when both exist because it needs no decompression.
        candidates = (directory / stem, directory / f"{stem}.gz")
        existing = [path for path in candidates if path.is_file()]
        if existing:
            found.append(existing[0])
        else:
            missing.append(f"{stem}[.gz]")
            folders.extend(path for path in candidates if path.is_dir())

    _reject_folders(folders, f"dataset {name!r}", "an IDX file")
    if missing:
        hint = ""
        if all(entry.startswith("train-") for entry in missing):
            base = name.removesuffix(T10K_SUFFIX)
            hint = f"; if only the t10k files are available, use dataset '{base}{T10K_SUFFIX}'"
        raise FileNotFoundError(
            f"dataset {name!r}: file(s) {', '.join(missing)} not found in {directory}; "
            f"expected {', '.join(stems)}, each raw or gzip-compressed with a .gz suffix"
            f"{hint}"
        )
    return found


def _read_idx_pair(
    images_path: Path, labels_path: Path, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read matching IDX image and label files.

    Returns images (n, height, width, 1) float32 in [0, 1] and labels (n,) int32.
    """
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)

    if len(images) != len(labels):
        raise ValueError(f"image/label count mismatch: {images_path} has {len(images)} images "
                         f"but {labels_path} has {len(labels)} labels")
    _check_label_range(labels, num_classes, str(labels_path))

    return _scale_uint8(images)[..., np.newaxis], labels.astype(np.int32)


# ---------------------------------------------------------------------------
# CIFAR-10 binary version
# ---------------------------------------------------------------------------


def load_cifar10(directory: str | os.PathLike) -> Dataset:
    """Load the binary version of CIFAR-10 as (n, 32, 32, 3) float32 images in [0, 1].

    ``data_batch_1.bin`` .. ``data_batch_5.bin`` form the training set and
    ``test_batch.bin`` the test set. They may sit in ``directory`` itself or in its
    ``cifar-10-batches-bin/`` subfolder, which is what extracting
    ``cifar-10-binary.tar.gz`` creates.
    """
    directory = _require_directory(directory)
    batch_dir = _find_cifar10_dir(directory)

    train_parts = [_read_cifar10_batch(batch_dir / file) for file in CIFAR10_TRAIN_FILES]
    x_train = np.concatenate([images for images, _ in train_parts])
    y_train = np.concatenate([labels for _, labels in train_parts])
    x_test, y_test = _read_cifar10_batch(batch_dir / CIFAR10_TEST_FILE)

    dataset = Dataset("cifar10", x_train, y_train, x_test, y_test, CIFAR10_NUM_CLASSES)
    return check_dataset(dataset)


def _find_cifar10_dir(directory: Path) -> Path:
    """Return ``directory`` or its CIFAR-10 subfolder, whichever contains all six batch files."""
    expected = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    searched = [directory, directory / CIFAR10_SUBFOLDER]

    missing_by_dir = {}
    for candidate in searched:
        missing = [file for file in expected if not (candidate / file).is_file()]
        if not missing:
            return candidate
        missing_by_dir[candidate] = missing

    # Report the missing files of the folder that has the most of them present.
    closest = min(searched, key=lambda candidate: len(missing_by_dir[candidate]))
    _reject_folders(
        [closest / file for file in missing_by_dir[closest]],
        "dataset 'cifar10'",
        "a CIFAR-10 binary batch file",
    )
    raise FileNotFoundError(
        f"CIFAR-10 binary files not found: searched {searched[0]} and {searched[1]}; "
        f"expected {', '.join(expected)}; missing in {closest}: "
        f"{', '.join(missing_by_dir[closest])}. Extract cifar-10-binary.tar.gz into the "
        "data directory"
    )


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch file.

    Each record is 1 label byte followed by 3,072 pixel bytes: the 1,024 red values, then
    green, then blue, each a row-major 32x32 plane.

    Returns images (n, 32, 32, 3) float32 in [0, 1] and labels (n,) int32.
    """
    data = path.read_bytes()
    if len(data) == 0 or len(data) % CIFAR10_RECORD_BYTES != 0:
        raise ValueError(
            f"invalid CIFAR-10 file {path}: length {len(data)} bytes is not a positive "
            f"multiple of the {CIFAR10_RECORD_BYTES}-byte record size; the file is "
            "truncated or not a CIFAR-10 binary batch"
        )

    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    _check_label_range(labels, CIFAR10_NUM_CLASSES, str(path))

    # The file stores channels first (n, 3, 32, 32), but the library uses NHWC.
    images = records[:, 1:].reshape(-1, *CIFAR10_IMAGE_SHAPE).transpose(0, 2, 3, 1)
    return _scale_uint8(images), labels.astype(np.int32)


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _require_directory(directory: str | os.PathLike) -> Path:
    """Return ``directory`` as a Path, raising if it is empty, missing or not a directory."""
    # Path("") is Path("."), so an empty string would silently mean the current folder.
    if not os.fspath(directory).strip():
        raise ValueError(
            f"data directory {os.fspath(directory)!r} is blank; pass --data-dir "
            "(data_dir=...) with the folder that contains the dataset files"
        )
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"data directory {path} is a file, expected a directory")
    return path


def _reject_folders(paths: list[Path], source: str, expected: str) -> None:
    """Raise FileNotFoundError naming each of ``paths`` that is a folder.

    ``source`` starts the message and ``expected`` describes the file that belongs at each
    path. It raises FileNotFoundError rather than IsADirectoryError because the expected
    file is absent, and ``bpalt.cli`` and ``bpalt.bench`` report FileNotFoundError in one line.
    """
    folders = [path for path in paths if path.is_dir()]
    if not folders:
        return
    listed = ", ".join(str(path) for path in folders)
    verb = "is a folder" if len(folders) == 1 else "are folders"
    raise FileNotFoundError(
        f"{source}: {listed} {verb}, but {expected} is expected there; move each folder "
        "away and put the file in its place"
    )


def _scale_uint8(values: np.ndarray) -> np.ndarray:
    """Scale uint8 pixel values 0..255 to float32 in [0, 1]."""
    return values.astype(np.float32) / np.float32(255.0)


def _check_label_range(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raise ValueError naming the first label outside ``0 .. num_classes - 1`` and its index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        index = int(bad[0])
        raise ValueError(
            f"{source}: label {int(labels[index])} at index {index} is out of range, "
            f"expected 0..{num_classes - 1} ({bad.size} invalid label(s) in total)"
        )


def _check_finite_unit_range(images: np.ndarray, source: str) -> None:
    """Raise ValueError if any pixel value is NaN, infinite or outside [0, 1]."""
    if images.size == 0:
        return

    # min and max propagate NaN and expose infinities without a full-size boolean mask,
    # which would take about 150 MB for the CIFAR-10 training set. The mask is built only
    # to locate a bad value.
    low, high = float(images.min()), float(images.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        flat_index = int(np.flatnonzero(~np.isfinite(images.reshape(-1)))[0])
        index = tuple(int(i) for i in np.unravel_index(flat_index, images.shape))
        raise ValueError(f"{source}: non-finite pixel value {images[index]} at index {index}")

    if low < 0.0 or high > 1.0:
        raise ValueError(f"{source}: pixel values must be in [0, 1], "
                         f"found min {low} and max {high}")
