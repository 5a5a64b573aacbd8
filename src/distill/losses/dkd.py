"""Decoupled Knowledge Distillation (DKD).

Reference: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022.
Official code: megvii-research/mdistiller, ``mdistiller/distillers/DKD.py`` (``dkd_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_logits,
    check_temperature,
    kl_rows,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES


def _check_labels(labels: torch.Tensor, student_logits: torch.Tensor) -> None:
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but student_logits' leading dims are "
            f"{tuple(student_logits.shape[:-1])}"
        )


def decoupled_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)`` per row (without the ``T^2`` factor) for rows ``[P, C]`` and labels ``[P]``.

    * TCKD = ``KL(b_T || b_S)`` with ``b = (p_t, 1 - p_t)``, the binary target / non-target
      probabilities at temperature ``T``.
    * NCKD = ``KL(p̂_T || p̂_S)`` over the ``C - 1`` non-target classes renormalized among
      themselves (``p̂_i = p_i / (1 - p_t)``).

    ``log(1 - p_t)`` is a ``logsumexp`` of the non-target log-probabilities, so nothing underflows
    for extreme logits. mdistiller computes NCKD as a softmax of ``z / T - 1000 * onehot(target)``;
    we drop the target class exactly, which is the limit of that masking and stays exact when the
    target logit is within 1000 of the others' (e.g. logits of 1e4).
    """
    rows, classes = student_logits.shape
    target = F.one_hot(labels.long(), classes).bool()
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)

    def binary(log_probs: torch.Tensor) -> torch.Tensor:
        log_target = log_probs.gather(-1, labels.long().unsqueeze(-1))
        log_other = torch.logsumexp(log_probs.masked_fill(target, float("-inf")), dim=-1, keepdim=True)
        return torch.cat([log_target, log_other], dim=-1)

    student_binary, teacher_binary = binary(student_log_probs), binary(teacher_log_probs)
    tckd = kl_rows(teacher_binary, student_binary)

    other = ~target
    student_other = F.log_softmax(student_logits[other].reshape(rows, classes - 1) / temperature, dim=-1)
    teacher_other = F.log_softmax(teacher_logits[other].reshape(rows, classes - 1) / temperature, dim=-1)
    nckd = kl_rows(teacher_other, student_other)
    return tckd, nckd


@LOSSES.register(
    "dkd", summary="Decoupled KD: alpha*TCKD + beta*NCKD at temperature T, times T^2 (Zhao et al., CVPR 2022)."
)
def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Decoupled Knowledge Distillation of Zhao et al. (CVPR 2022), with the official code's scaling.

    Per position, with ``p = softmax(z / T)`` and target class ``t = labels``::

        TCKD = KL(b_T || b_S),   b = (p_t, 1 - p_t)                  (target vs. non-target)
        NCKD = KL(p̂_T || p̂_S),   p̂_i = p_i / (1 - p_t) for i != t   (among non-target classes)
        DKD  = (alpha * TCKD + beta * NCKD) * T^2

    The paper shows that classical KD decomposes as ``KD = TCKD + (1 - p_t^T) * NCKD``; DKD
    replaces the coupling weight ``1 - p_t^T`` by the free hyper-parameter ``beta``. The ``T^2``
    factor is not in the paper's equations but is in the official code (``dkd_loss`` multiplies
    both terms by ``temperature**2``), and the defaults ``alpha=1, beta=8, T=4`` are the code's
    CIFAR-100 settings. The code's warm-up factor ``min(epoch / warmup, 1)`` is a schedule, not
    part of the loss: weight the term in the objective for it.

    ``labels`` are integer class indices ``[...]``; positions whose label is ``ignore_index`` are
    masked. Needs ``C >= 2`` classes. Teacher detached, float32; see :mod:`distill.losses._common`
    for ``mask`` and ``reduction``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    _check_labels(labels, student_logits)
    if student_logits.shape[-1] < 2:
        raise ValueError("dkd needs at least 2 classes (a target and a non-target class)")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    labels = labels.to(student_logits.device)
    label_valid = labels != ignore_index
    mask = label_valid if mask is None else (mask & label_valid)
    student_rows, teacher_rows, label_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), labels, leading_dims=len(leading_shape)
    )
    tckd, nckd = decoupled_terms(as_float32(student_rows), as_float32(teacher_rows), label_rows, temperature)
    per_row = (alpha * tckd + beta * nckd) * (temperature**2)
    return reduce_rows(per_row, mask, leading_shape, reduction)
