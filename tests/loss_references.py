"""Hand-written float64 references shared by the tests of the losses on (positive, negative) response pairs
(REDI, QCRD): pairs ``[B, 2, T, V]`` of logits with labels and a mask ``[B, 2, T]``, side 0 the positive."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Side = tuple[float, int]
"""A response's mean log-likelihood per counted token, and the number of counted tokens."""


def mean_log_likelihood(data: dict, b: int, side: int) -> Side:
    """Mean ``log softmax(logits)[label]`` over the positions of response ``data[...][b, side]`` whose label is
    not -100 and whose mask is True (0.0 when none is), and their number."""
    total, count = 0.0, 0
    for t in range(data["labels"].shape[-1]):
        label = int(data["labels"][b, side, t])
        if label == -100 or not bool(data["mask"][b, side, t]):
            continue
        row = data["student"][b, side, t].double().tolist()
        top = max(row)
        total += row[label] - top - math.log(sum(math.exp(x - top) for x in row))
        count += 1
    return (total / count if count else 0.0), count


def pair_reference(data: dict, pair_loss: Callable[[int, Side, Side], float], reduction: str) -> torch.Tensor:
    """``pair_loss(b, positive, negative)`` for every pair ``b``, reduced per pair: a pair without any counted
    token is 0 and does not count; ``"none"``: the ``[B]`` values, ``"sum"``: their sum, otherwise their sum
    over the number of pairs that count."""
    pairs = data["labels"].shape[0]
    per_pair = torch.zeros(pairs, dtype=torch.float64)
    counted = 0
    for b in range(pairs):
        positive, negative = mean_log_likelihood(data, b, 0), mean_log_likelihood(data, b, 1)
        if positive[1] == 0 and negative[1] == 0:
            continue
        per_pair[b] = pair_loss(b, positive, negative)
        counted += 1
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.sum() / counted
