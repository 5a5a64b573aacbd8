"""Distillation losses for neural ranking models.

Reference: S. Hofstätter, S. Althammer, M. Schröder, M. Sertkan, A. Hanbury, "Improving Efficient
Neural Ranking Models with Cross-Architecture Knowledge Distillation", arXiv 2010.02666, 2020.
"""

from __future__ import annotations

import torch

from distill.losses._common import as_float32, check_logits, reduce_rows, valid_mask, valid_rows
from distill.registry import LOSSES


@LOSSES.register(
    "margin_mse",
    summary="Margin-MSE: squared error between student and teacher (positive - negative) score margins (Hofstätter et al. 2020).",
)
def margin_mse(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Margin-MSE of Hofstätter et al. (2020): match the teacher's score margin, not its scores.

    ``student_scores`` and ``teacher_scores`` have shape ``[..., 2]``: the scores of the relevant
    (positive) and the non-relevant (negative) passage of each ``(query, pos, neg)`` triple, in
    that order. Per triple::

        loss = ((s_pos - s_neg) - (t_pos - t_neg))^2

    Only the margin is matched, so the student's scores may be shifted by any per-triple offset
    from the teacher's (the paper's point: architectures produce scores of different
    magnitudes, and only their differences matter for ranking). ``"batchmean"`` averages over the valid triples, which is the paper's
    ``MSE`` over a batch. ``mask`` is over the leading dims ``[...]``. Teacher detached; float32.
    """
    check_logits(student_scores, teacher_scores)
    if student_scores.shape[-1] != 2:
        raise ValueError(
            f"margin_mse needs scores of shape [..., 2] (positive, negative), got {tuple(student_scores.shape)}"
        )
    leading_shape = student_scores.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_scores.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_scores, teacher_scores.detach(), leading_dims=len(leading_shape)
    )
    student_rows = as_float32(student_rows)
    teacher_rows = as_float32(teacher_rows).to(student_rows.dtype)
    student_margin = student_rows[..., 0] - student_rows[..., 1]
    teacher_margin = teacher_rows[..., 0] - teacher_rows[..., 1]
    per_row = (student_margin - teacher_margin).square()
    return reduce_rows(per_row, mask, leading_shape, reduction)
