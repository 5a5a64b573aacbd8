"""Turn a :class:`RawDataset` into fixed, normalized train/val/test splits (:class:`DataBundle`).

Every random choice here is drawn from a ``torch.Generator`` seeded from ``data.split_seed`` and
the purpose of the draw (``"test"``, ``"val"``, ``"train_subset"``, ``"test_subset"``), never
from the global RNG: the splits depend on the data and the ``data`` settings only, so runs with
different ``seed`` values (and every process of a multi-process run) see the same splits, and
changing e.g. ``train_subset`` does not move samples between val and test.

Splits whose rows carry ``groups`` (domain indices, see :class:`~distill.data.base.ArraySplit`)
keep them through every draw, and the draws are stratified by group: for token sequences with
at least one row of every group on each side where the group has 2 rows or more (see
:func:`group_quotas`), so that validation and test splits hold every domain; for class labels
jointly by (class, group).
"""

from __future__ import annotations

import hashlib
import json

import torch

from distill.config.schema import DataSpec
from distill.data.base import IGNORE_INDEX, TASKS, ArraySplit, DataBundle, RawDataset

#: Standard deviations are floored at this value so constant channels/features do not divide by 0.
STD_FLOOR = 1e-6


def split_generator(split_seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded by ``(split_seed, purpose)``: independent streams per kind of draw."""
    digest = hashlib.sha256(f"distill-split:{split_seed}:{purpose}".encode()).digest()
    generator = torch.Generator()
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


def stratified_quotas(class_counts: torch.Tensor, total: int) -> torch.Tensor:
    """How many samples of each class to take so that ``total`` are taken, proportionally.

    ``class_counts`` is ``[K]`` int64. Each class gets the floor of its exact share
    ``total * n_c / N``; the samples still missing go one each to the classes with the largest
    remainders (ties to the lower class index), so the quotas sum exactly to ``total`` and no quota
    exceeds its class count. Returns ``[K]`` int64.
    """
    size = int(class_counts.sum())
    if not 0 <= total <= size:
        raise ValueError(f"cannot take {total} of {size} samples")
    if size == 0:
        return torch.zeros_like(class_counts)
    exact = class_counts * total
    quotas = exact // size
    remainders = exact % size
    missing = total - int(quotas.sum())
    if missing > 0:
        # Stable sort on -remainder: largest remainders first, ties by class index.
        order = torch.sort(-remainders, stable=True).indices
        quotas[order[:missing]] += 1
    return quotas


def stratified_choice(
    labels: torch.Tensor, count: int, generator: torch.Generator, num_classes: int,
    quotas: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``count`` of the samples with ``labels`` ``[N]``, stratified by class.

    Within each class the chosen samples are a uniformly random subset (drawn from
    ``generator``); class quotas come from :func:`stratified_quotas` unless given (``[K]`` int64,
    summing to ``count``). Returns the chosen and the remaining indices, each sorted ascending
    (int64 ``[count]`` and ``[N - count]``).
    """
    size = int(labels.shape[0])
    class_counts = torch.bincount(labels, minlength=num_classes)
    if quotas is None:
        quotas = stratified_quotas(class_counts, count)
    permutation = torch.randperm(size, generator=generator)
    # Group the shuffled samples by class, keeping the shuffled order inside each class.
    grouped = permutation[torch.sort(labels[permutation], stable=True).indices]
    grouped_labels = labels[grouped]
    class_starts = torch.cumsum(class_counts, 0) - class_counts
    rank_in_class = torch.arange(size) - class_starts[grouped_labels]
    chosen_mask = rank_in_class < quotas[grouped_labels]
    chosen = torch.sort(grouped[chosen_mask]).values
    rest = torch.sort(grouped[~chosen_mask]).values
    return chosen, rest


def _fraction_count(fraction: float, size: int) -> int:
    return int(fraction * size + 0.5)


def _carve(
    split: ArraySplit, fraction: float, key: str, split_seed: int, num_classes: int, what: str
) -> tuple[ArraySplit, ArraySplit]:
    """Hold out ``fraction`` of ``split`` (stratified). Returns ``(kept, held_out)``."""
    count = _fraction_count(fraction, len(split))
    if count == 0:
        raise ValueError(
            f"{key} = {fraction} of {len(split)} samples rounds to 0 {what} samples; raise {key}"
            + (" or set it to 0 for no validation split" if key == "data.val_fraction" else "")
        )
    if count >= len(split):
        raise ValueError(
            f"{key} = {fraction} of {len(split)} samples leaves no training samples; lower {key}"
        )
    held_out, kept = _choice(split, count, split_generator(split_seed, what), num_classes)
    return split.subset(kept), split.subset(held_out)


def group_quotas(group_counts: torch.Tensor, total: int, both_sides: bool = True) -> torch.Tensor:
    """:func:`stratified_quotas` of ``total`` over groups (domains), adjusted so that every group
    has at least one row taken and, with ``both_sides``, one left, where ``total`` allows it: a
    missing row is moved from the group whose quota is largest (and above 1), or given back by the
    group that would otherwise be taken whole. With ``both_sides`` only groups of at least 2 rows
    qualify (a carved split: held out vs kept); without, every non-empty group (a subsample).
    Returns ``[G]`` int64."""
    quotas = stratified_quotas(group_counts, total)
    eligible = group_counts >= (2 if both_sides else 1)
    for group in torch.nonzero(eligible & (quotas == 0)).flatten().tolist():
        donors = torch.where(quotas > 1, quotas, torch.zeros_like(quotas))
        donor = int(donors.argmax())
        if int(donors[donor]) == 0:
            break
        quotas[donor] -= 1
        quotas[group] += 1
    if not both_sides:
        return quotas
    for group in torch.nonzero(eligible & (quotas == group_counts)).flatten().tolist():
        room = torch.where(quotas < group_counts - 1, group_counts - 1 - quotas, torch.zeros_like(quotas))
        room[group] = 0
        receiver = int(room.argmax())
        if int(room[receiver]) == 0:
            break
        quotas[group] -= 1
        quotas[receiver] += 1
    return quotas


def _choice(
    split: ArraySplit, count: int, generator: torch.Generator, num_classes: int, both_sides: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``count`` rows of ``split``: stratified by class for class labels ``[N]``, a uniform
    draw for token sequences; with ``groups``, stratified by group (token sequences; every group
    among the chosen rows and, with ``both_sides``, among the rest, where possible, see
    :func:`group_quotas`) or jointly by class and group (class labels)."""
    labels = split.labels
    if split.groups is not None:
        groups = split.groups
        num_groups = int(groups.max()) + 1 if groups.numel() else 1
        if labels.dim() == 1:
            # Joint strata (class, group): class shares and group shares both stay close to exact.
            strata = labels * num_groups + groups
            return stratified_choice(strata, count, generator, num_classes * num_groups)
        quotas = group_quotas(torch.bincount(groups, minlength=num_groups), count, both_sides)
        return stratified_choice(groups, count, generator, num_groups, quotas=quotas)
    if labels.dim() == 1:
        return stratified_choice(labels, count, generator, num_classes)
    permutation = torch.randperm(int(labels.shape[0]), generator=generator)
    return torch.sort(permutation[:count]).values, torch.sort(permutation[count:]).values


def _subsample(
    split: ArraySplit, count: int | None, key: str, split_seed: int, num_classes: int, what: str
) -> ArraySplit:
    if count is None:
        return split
    if count > len(split):
        raise ValueError(
            f"{key} = {count} is larger than the {what} split, which has {len(split)} samples; "
            f"lower {key} to at most {len(split)} or remove it"
        )
    chosen, _ = _choice(split, count, split_generator(split_seed, f"{what}_subset"), num_classes, both_sides=False)
    return split.subset(chosen)


def _statistic_dims(inputs: torch.Tensor) -> tuple[int, ...]:
    """Dimensions reduced for per-channel (images, dim 1) or per-feature (``[N, D]``) statistics."""
    if inputs.dim() == 2:
        return (0,)
    if inputs.dim() >= 3:
        return (0,) + tuple(range(2, inputs.dim()))
    raise ValueError(
        f"cannot normalize inputs of shape {tuple(inputs.shape)}: expected [N, D] features or [N, C, ...] "
        "images; set data.normalize: false"
    )


def channel_statistics(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (population, floored at :data:`STD_FLOOR`) per channel.

    Images ``[N, C, H, W]`` give ``[C]`` statistics over N, H, W; features ``[N, D]`` give ``[D]``.
    Computed in float64, returned in ``inputs.dtype``.
    """
    dims = _statistic_dims(inputs)
    values = inputs.detach().to(torch.float64)
    mean = values.mean(dim=dims)
    std = values.var(dim=dims, unbiased=False).sqrt().clamp_min(STD_FLOOR)
    return mean.to(inputs.dtype), std.to(inputs.dtype)


def normalize_inputs(inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(inputs - mean) / std`` with ``[C]`` (or ``[D]``) statistics broadcast along dim 1."""
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    return (inputs - mean.reshape(shape)) / std.reshape(shape)


def _normalized(split: ArraySplit, mean: torch.Tensor, std: torch.Tensor) -> ArraySplit:
    return ArraySplit(normalize_inputs(split.inputs, mean, std), split.labels, split.groups)


def split_fingerprint(raw: RawDataset, spec: DataSpec) -> str:
    """sha256 hex of the raw data's fingerprint and every setting that shapes the splits."""
    settings = {
        "raw": raw.fingerprint(),
        "split_seed": spec.split_seed,
        "val_fraction": spec.val_fraction,
        "test_fraction": spec.test_fraction,
        "train_subset": spec.train_subset,
        "test_subset": spec.test_subset,
        "normalize": spec.normalize,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _check_labels(split: ArraySplit, num_classes: int, where: str, task: str = "classification") -> None:
    if task == "lm":
        _check_tokens(split, num_classes, where)
        return
    if split.labels.dtype != torch.int64:
        raise ValueError(f"{where} labels have dtype {split.labels.dtype}; data set builders must return int64 labels")
    if split.labels.dim() != 1:
        raise ValueError(f"{where} labels have shape {tuple(split.labels.shape)}; expected [N]")
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= num_classes):
        raise ValueError(
            f"{where} labels span {int(split.labels.min())}..{int(split.labels.max())} but the data set "
            f"declares num_classes = {num_classes}; labels must lie in 0..{num_classes - 1}"
        )


def _check_tokens(split: ArraySplit, vocab_size: int, where: str) -> None:
    """Token ids ``[N, T]`` and shifted labels ``[N, T]`` (targets or IGNORE_INDEX) within the vocabulary."""
    for name, tensor in (("input ids", split.inputs), ("labels", split.labels)):
        if tensor.dtype != torch.int64 or tensor.dim() < 2:
            raise ValueError(f"{where} {name} must be int64 [N, T] (or [N, 2, T] preference pairs); got {tensor.dtype} {tuple(tensor.shape)}")
    if split.inputs.shape != split.labels.shape:
        raise ValueError(f"{where}: input ids {tuple(split.inputs.shape)} and labels {tuple(split.labels.shape)} differ in shape")
    if not len(split):
        return
    targets = split.labels[split.labels != IGNORE_INDEX]
    if int(split.inputs.min()) < 0 or int(split.inputs.max()) >= vocab_size:
        raise ValueError(f"{where} token ids span {int(split.inputs.min())}..{int(split.inputs.max())}, outside the vocabulary of {vocab_size}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"{where} labels must be token ids in 0..{vocab_size - 1} or {IGNORE_INDEX}; got {int(targets.min())}..{int(targets.max())}"
        )


def prepare(raw: RawDataset, spec: DataSpec) -> DataBundle:
    """Fixed train/val/test splits of ``raw`` per ``spec``, normalized with training statistics.

    1. test: ``raw.test`` if the data set has one, else ``spec.test_fraction`` of the training
       split, stratified by class;
    2. val: ``spec.val_fraction`` of the remaining training split, stratified (None when 0);
    3. ``spec.train_subset`` / ``spec.test_subset``: stratified subsamples of train / test;
    4. normalization: per-channel (images) or per-feature (``[N, D]``) mean/std of the final
       training split, applied to every split (skipped for non-floating inputs such as token ids,
       and when ``spec.normalize`` is false; the bundle's mean/std are then None).

    Every draw is seeded by ``spec.split_seed`` alone (see :func:`split_generator`). ``raw`` is
    not modified.
    """
    num_classes = raw.num_classes
    if raw.task not in TASKS:
        raise ValueError(f"data set '{raw.name}' declares task '{raw.task}'; expected one of {', '.join(TASKS)}")
    _check_labels(raw.train, num_classes, f"data set '{raw.name}' train", raw.task)
    if raw.test is not None:
        _check_labels(raw.test, num_classes, f"data set '{raw.name}' test", raw.task)
        if (raw.train.groups is None) != (raw.test.groups is None):
            with_groups = "train" if raw.train.groups is not None else "test"
            raise ValueError(
                f"data set '{raw.name}': only the {with_groups} split carries groups (domain indices); "
                "a builder must give groups to both splits or to neither"
            )
        if raw.test.inputs.shape[1:] != raw.train.inputs.shape[1:]:
            raise ValueError(
                f"data set '{raw.name}': train inputs are {tuple(raw.train.inputs.shape[1:])} per sample but "
                f"test inputs are {tuple(raw.test.inputs.shape[1:])}"
            )
    augment = spec.augment
    if (augment.random_crop > 0 or augment.hflip) and raw.train.inputs.dim() != 4:
        raise ValueError(
            f"data.augment asks for {'random_crop' if augment.random_crop > 0 else 'hflip'}, which needs images "
            f"[N, C, H, W], but data set '{raw.name}' has inputs of shape {tuple(raw.train.inputs.shape)}; "
            "set data.augment.random_crop: 0 and data.augment.hflip: false"
        )

    train = raw.train
    if raw.test is not None:
        test = raw.test
    else:
        if spec.test_fraction == 0:
            raise ValueError(
                f"data set '{raw.name}' has no test split and data.test_fraction is 0; "
                "set data.test_fraction > 0 (e.g. 0.2) to hold one out"
            )
        train, test = _carve(train, spec.test_fraction, "data.test_fraction", spec.split_seed, num_classes, "test")
    val: ArraySplit | None = None
    if spec.val_fraction > 0:
        train, val = _carve(train, spec.val_fraction, "data.val_fraction", spec.split_seed, num_classes, "val")
    train = _subsample(train, spec.train_subset, "data.train_subset", spec.split_seed, num_classes, "train")
    test = _subsample(test, spec.test_subset, "data.test_subset", spec.split_seed, num_classes, "test")

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    if spec.normalize and train.inputs.is_floating_point():
        mean, std = channel_statistics(train.inputs)
        train = _normalized(train, mean, std)
        test = _normalized(test, mean, std)
        val = _normalized(val, mean, std) if val is not None else None

    return DataBundle(
        name=raw.name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        input_shape=tuple(train.inputs.shape[1:]),
        class_names=list(raw.class_names) or ([] if raw.task == "lm" else [str(label) for label in range(num_classes)]),
        mean=mean,
        std=std,
        fingerprint=split_fingerprint(raw, spec),
        task=raw.task,
        meta=dict(raw.meta),
    )
