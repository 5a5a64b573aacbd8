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

IGNORE_INDEX = -100
"""Label of a token position that is not a target (padding, prompt, the last position)."""

TASKS = ("classification", "lm")


@dataclass
class ArraySplit:
    """Inputs ``[N, ...]`` and labels, one row per sample.

    Classification: inputs are images ``[N, C, H, W]`` float32 or features ``[N, D]``, labels ``[N]``
    int64. Language modelling (``task="lm"``): inputs are token ids ``[N, T]`` int64, right-padded,
    and labels ``[N, T]`` int64 are the *shifted* targets: ``labels[i, t]`` is the token that position
    ``t`` must predict (``input_ids[i, t + 1]``), or :data:`IGNORE_INDEX` where position ``t`` is not
    trained on (padding, prompt tokens, the last position). With causal attention and right padding,
    no valid position attends to padding, so no attention mask is needed to train or score.

    ``groups`` (optional) is an int64 ``[N]`` tensor: the group (domain) index of each row, e.g. the
    source corpus of each token block in a multi-domain data set (see :mod:`distill.data.domains`).
    It travels with the rows through :meth:`subset` and every split of
    :func:`distill.data.splits.prepare`, which then stratifies its draws by group.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"inputs and labels differ in length: {self.inputs.shape[0]} inputs, {self.labels.shape[0]} labels"
            )
        if self.groups is not None:
            if not isinstance(self.groups, torch.Tensor):
                raise TypeError(f"groups must be a torch.Tensor of group indices, got {type(self.groups).__name__}")
            if self.groups.dim() != 1 or self.groups.dtype != torch.int64:
                raise ValueError(
                    f"groups must be an int64 tensor [N] (one group index per row); got {self.groups.dtype} "
                    f"{tuple(self.groups.shape)}"
                )
            if self.groups.shape[0] != self.labels.shape[0]:
                raise ValueError(
                    f"groups and labels differ in length: {self.groups.shape[0]} group indices, "
                    f"{self.labels.shape[0]} rows"
                )
            if self.groups.numel() and int(self.groups.min()) < 0:
                raise ValueError(f"groups must be indices >= 0; got {int(self.groups.min())}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ArraySplit:
        groups = self.groups[indices] if self.groups is not None else None
        return ArraySplit(self.inputs[indices], self.labels[indices], groups)


@dataclass
class RawDataset:
    """What a data set builder returns."""

    name: str
    train: ArraySplit
    test: ArraySplit | None
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    task: str = "classification"
    """``classification`` or ``lm`` (token sequences; ``num_classes`` is then the vocabulary size)."""
    meta: dict = field(default_factory=dict)
    """What else the engine needs to know; for ``lm``: ``tokenizer`` (its source), ``tokenizer_hash``,
    ``pad_token_id``, ``eos_token_id``, and ``prompt_tokens`` for plain text (the prefix used as a
    prompt by on-policy and sequence-level distillation)."""

    def fingerprint(self) -> str:
        """sha256 over the arrays' bytes: identifies the exact data a run used."""
        digest = hashlib.sha256(self.name.encode())
        if self.task != "classification":
            digest.update(self.task.encode())
        for split in (self.train, self.test):
            if split is None:
                continue
            digest.update(split.inputs.detach().contiguous().cpu().numpy().tobytes())
            digest.update(split.labels.detach().contiguous().cpu().numpy().tobytes())
            if split.groups is not None:
                # Only when present, so fingerprints of data without groups are unchanged.
                digest.update(b"groups")
                digest.update(split.groups.detach().contiguous().cpu().numpy().tobytes())
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
    task: str = "classification"
    meta: dict = field(default_factory=dict)

    @property
    def is_lm(self) -> bool:
        return self.task == "lm"
