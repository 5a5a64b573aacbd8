"""Shared machinery of the loss functions: float32 promotion, masking, reductions.

Conventions every loss in :mod:`distill.losses` follows:

* Tensor inputs are positional (``student_logits``, ``teacher_logits``, ``labels``), of shape
  ``[..., C]`` for logits and ``[...]`` for labels; hyper-parameters are keyword-only.
* ``mask`` is an optional boolean tensor over the leading dims ``[...]``: ``True`` marks a valid
  position. Masked positions contribute nothing to the value or to the gradient.
* ``reduction`` is ``"batchmean"`` (sum over classes, mean over valid positions), ``"sum"`` (sum
  over classes and valid positions) or ``"none"`` (one value per position, shape ``[...]``, 0 at
  masked positions). A fully masked input gives 0 and a zero gradient, never NaN.
* Losses select the valid positions first (:func:`valid_rows`) and compute on those rows only.
* Everything is computed in float32 whatever the input dtype; the teacher side is detached.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["batchmean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("batchmean", "sum", "none")


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 (float64 is kept, so gradient checks can run in double precision)."""
    if tensor.dtype == torch.float64:
        return tensor
    return tensor.float()


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a class dimension: shape [..., C]")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape [..., C]"
        )


def valid_mask(mask: torch.Tensor | None, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """``mask`` checked against the leading dims and turned into bool, or None for all-valid."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the logits' leading dims are {tuple(leading_shape)}")
    return mask.to(device=device, dtype=torch.bool)


def valid_rows(mask: torch.Tensor | None, *tensors: torch.Tensor, leading_dims: int) -> list[torch.Tensor]:
    """Each tensor's valid positions as rows: ``[P, ...]`` with the ``leading_dims`` flattened.

    Masked positions are dropped *before* any arithmetic, so whatever they hold (padding
    garbage, even inf) cannot reach the value or the gradient, and no work is spent on them.
    """
    if mask is None:
        return [t.reshape(-1, *t.shape[leading_dims:]) for t in tensors]
    return [t[mask] for t in tensors]


def reduce_rows(
    per_row: torch.Tensor, mask: torch.Tensor | None, leading_shape: torch.Size, reduction: str
) -> torch.Tensor:
    """Reduce per-valid-position values ``[P]`` (from :func:`valid_rows`) as ``reduction`` says.

    ``"none"`` scatters them back to ``leading_shape`` with zeros at masked positions. A fully
    masked input (``P = 0``) gives an exact 0 with a zero gradient.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")
    if reduction == "none":
        if mask is None:
            return per_row.reshape(leading_shape)
        return per_row.new_zeros(leading_shape).masked_scatter(mask, per_row)
    total = per_row.sum()
    if reduction == "sum":
        return total
    return total / max(per_row.shape[0], 1)


def count_valid(mask: torch.Tensor | None, leading_shape: torch.Size) -> int:
    """Number of valid positions: the denominator of ``batchmean``."""
    if mask is None:
        n = 1
        for size in leading_shape:
            n *= int(size)
        return n
    return int(mask.sum())


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs_of_valid_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size]:
    """Checked inputs -> (student log q, teacher log p) at temperature T on the valid rows ``[P, C]``
    (float32; the teacher detached), the checked mask, and the logits' leading shape."""
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    student_log_probs = F.log_softmax(as_float32(student_rows) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(as_float32(teacher_rows) / temperature, dim=-1)
    return student_log_probs, teacher_log_probs, mask, leading_shape


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last dim, clamped at 0.

    ``p = exp(log_p)``. Where ``p_c`` underflows to 0 the term is exactly 0 (the log
    probabilities are finite for finite logits, so no ``0 * inf``). The clamp removes the tiny
    negative values that rounding can produce when the two distributions are equal.
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)
