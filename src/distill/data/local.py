"""Data set builders that read the user's own local files: image folders, .npz arrays and
Hugging Face data sets saved on disk. Registered in :data:`distill.registry.DATASETS`.

The conventions are those of :mod:`distill.data.vision` (float32 images ``[N, C, H, W]`` in
``[0, 1]`` or features ``[N, D]``, int64 labels); nothing here reaches the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from distill.data.base import ArraySplit, RawDataset
from distill.data.vision import (
    IMAGE_EXTENSIONS,
    _check_channels,
    _check_image_size,
    _count_classes,
    _inputs_from_array,
    _labels_from_array,
    _pil_images_to_tensor,
)
from distill.registry import DATASETS


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
