"""Which samples go into which micro-batch, on which process: a pure function of the seed.

The order of an epoch is a permutation drawn from ``(seed, epoch)``; a global micro-batch of
``batch_size`` samples is cut into one contiguous slice per process. Nothing depends on the global
random state or on the number of processes beyond that slicing, so a run on two processes sees the
same global batches as a run on one, and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for one purpose (``derive_seed(0, "init", "student")``), stable across runs."""
    text = "/".join([str(seed), *map(str, labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batches(num_samples: int, batch_size: int, seed: int, epoch: int, world_size: int = 1) -> list[torch.Tensor]:
    """The global micro-batches of one epoch (sample indices).

    A last, partial batch is kept when every process gets at least 2 samples of it (BatchNorm
    needs 2 in training) and dropped otherwise.
    """
    order = epoch_order(num_samples, seed, epoch)
    batches = list(torch.split(order, batch_size))
    if batches and len(batches[-1]) < batch_size and len(batches[-1]) < 2 * world_size:
        batches.pop()
    return batches


def local_slice(indices: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This process's contiguous share of a global batch (or of an evaluation set)."""
    if world_size == 1:
        return indices
    return torch.tensor_split(indices, world_size)[rank]


def steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    return -(-num_batches // grad_accum_steps)
