"""In-memory data sets: what every data set builder returns, and what the engine consumes.

A data set builder (registered in :data:`distill.registry.DATASETS`) returns a :class:`RawDataset`:
whole arrays of inputs and integer labels, with the data set's own test split where it has one.
:func:`distill.data.splits.prepare` turns that into a :class:`DataBundle` of fixed train/val/test
splits, normalized, with the statistics and shapes models need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch


@dataclass
class ArraySplit:
    """Inputs ``[N, ...]`` (images ``[N, C, H, W]`` float32, features ``[N, D]``) and labels ``[N]`` int64."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"inputs and labels differ in length: {self.inputs.shape[0]} inputs, {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> "ArraySplit":
        return ArraySplit(self.inputs[indices], self.labels[indices])


@dataclass
class RawDataset:
    """What a data set builder returns."""

    name: str
    train: ArraySplit
    test: ArraySplit | None
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over the arrays' bytes: identifies the exact data a run used."""
        digest = hashlib.sha256(self.name.encode())
        for split in (self.train, self.test):
            if split is None:
                continue
            digest.update(split.inputs.detach().contiguous().cpu().numpy().tobytes())
            digest.update(split.labels.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()


@dataclass
class DataBundle:
    """Fixed splits ready for training: normalized inputs, shapes and statistics."""

    name: str
    train: ArraySplit
    val: ArraySplit | None
    test: ArraySplit
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    fingerprint: str = ""
