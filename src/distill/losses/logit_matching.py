"""Direct matching of the student's logits to the teacher's, without a softmax.

References: J. Ba, R. Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014 (regression on
the logits). Conventions (``mask``, ``reduction``, float32, detached teacher) as in
:mod:`distill.losses._common`. No temperature: it would only rescale these losses.
"""

from __future__ import annotations

import torch

from distill.losses._common import as_float32, check_logits, reduce_rows, valid_mask, valid_rows
from distill.registry import LOSSES


def _logit_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size]:
    check_logits(student_logits, teacher_logits)
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    return as_float32(student_rows), as_float32(teacher_rows), mask, leading_shape


@LOSSES.register("logit_mse", summary="Squared L2 distance between student and teacher logits (Ba & Caruana 2014).")
def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Logit regression of Ba & Caruana (2014), section 2.3: ``sum_c (z_s,c - z_t,c)^2`` per position.

    The paper's objective is ``1/(2N) sum_n ||z_s - z_t||^2``; with ``reduction="batchmean"`` this
    function gives ``1/N sum_n ||z_s - z_t||^2``, i.e. twice it (put the 1/2 in the term's weight).
    The sum over classes (not a mean) is what ``batchmean`` means throughout :mod:`distill.losses`.
    Teacher detached; computed in float32.
    """
    student_rows, teacher_rows, mask, leading_shape = _logit_rows(student_logits, teacher_logits, mask)
    per_row = (student_rows - teacher_rows).pow(2).sum(dim=-1)
    return reduce_rows(per_row, mask, leading_shape, reduction)


@LOSSES.register("logit_cosine", summary="1 - cosine similarity of the student and teacher logit vectors.")
def logit_cosine(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``1 - <z_s, z_t> / (max(||z_s||, eps) max(||z_t||, eps))`` per position, in ``[0, 2]``.

    Invariant to a positive rescaling of either logit vector (but not to a shift, unlike the
    softmax). ``eps = 1e-8`` keeps an all-zero logit vector finite (its similarity is then 0).
    Clamped at 0 against rounding; teacher detached; computed in float32.
    """
    student_rows, teacher_rows, mask, leading_shape = _logit_rows(student_logits, teacher_logits, mask)
    eps = 1e-8
    student_norm = torch.linalg.vector_norm(student_rows, dim=-1).clamp_min(eps)
    teacher_norm = torch.linalg.vector_norm(teacher_rows, dim=-1).clamp_min(eps)
    cosine = (student_rows / student_norm.unsqueeze(-1) * (teacher_rows / teacher_norm.unsqueeze(-1))).sum(dim=-1)
    per_row = (1.0 - cosine).clamp_min(0.0)
    return reduce_rows(per_row, mask, leading_shape, reduction)
