"""Hinton knowledge distillation and the label cross-entropy.

References: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_logits,
    kl_rows,
    log_probs_of_valid_rows,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES


kl_per_position = kl_rows
"""``KL(p || q)`` per row from log probabilities (see :func:`distill.losses._common.kl_rows`)."""


@LOSSES.register(
    "hinton_kd", summary="Hinton KD: KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al. 2015)."
)
def hinton_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Knowledge distillation loss of Hinton et al. (2015), section 2: the soft-target term with its T^2 factor.

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` per position, where ``z_s, z_t`` are the
    student and teacher logits ``[..., C]``. The ``T^2`` factor keeps the gradient magnitude of the
    soft term comparable to the hard-label term when T changes ("the magnitudes of the gradients
    produced by the soft targets scale as 1/T^2"). The teacher is detached; the value is computed
    in float32. See :mod:`distill.losses._common` for ``mask`` and ``reduction``.
    """
    student_log_probs, teacher_log_probs, mask, leading_shape = log_probs_of_valid_rows(
        student_logits, teacher_logits, temperature, mask
    )
    per_row = kl_rows(teacher_log_probs, student_log_probs) * (temperature**2)
    return reduce_rows(per_row, mask, leading_shape, reduction)


@LOSSES.register("cross_entropy", summary="Cross-entropy with the labels, optional label smoothing.")
def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Cross-entropy between the student's logits ``[..., C]`` and integer labels ``[...]``.

    With ``label_smoothing = eps`` the target is ``(1 - eps) * onehot + eps / C`` (Szegedy et al.
    2016, "Rethinking the Inception Architecture", section 7). Positions whose label equals
    ``ignore_index`` count as masked. Computed in float32.
    """
    check_logits(student_logits)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but student_logits' leading dims are "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    label_valid = labels.to(student_logits.device) != ignore_index
    mask = label_valid if mask is None else (mask & label_valid)
    student_rows, label_rows = valid_rows(mask, student_logits, labels.to(student_logits.device), leading_dims=len(leading_shape))
    log_probs = F.log_softmax(as_float32(student_rows), dim=-1)
    nll = -log_probs.gather(-1, label_rows.long().unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        smooth = -log_probs.mean(dim=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return reduce_rows(nll, mask, leading_shape, reduction)
