"""BD-KD: entropy-balanced forward and reverse KL for the student.

Reference: I. Amara, N. Sepahvand, B. H. Meyer, W. J. Gross, J. J. Clark, "BD-KD: Balancing the
Divergences for Online Knowledge Distillation", arXiv 2212.12965 (v1 2022, v2 2024).
"""

from __future__ import annotations

import torch

from distill.losses._common import kl_rows, log_probs_of_valid_rows, reduce_rows
from distill.registry import LOSSES


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` (nats) over the last dim; 0 * log 0 counts as 0."""
    return (-(log_probs.exp() * log_probs).sum(dim=-1)).clamp_min(0.0)


def balance_weights(student_entropy: torch.Tensor, teacher_entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_forward, w_reverse)`` per sample from the two entropies (nats).

    ``w_reverse = H_S / (H_S + H_T)`` and ``w_forward = H_T / (H_S + H_T)``, so the weights add up
    to 1, are equal when the entropies are, and move towards the reverse KL when the student is
    less confident than the teacher (``H_S > H_T``) and towards the forward KL when it is more
    confident. Both entropies 0 (two one-hot distributions) gives ``(0.5, 0.5)``.
    """
    total = student_entropy + teacher_entropy
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    w_reverse = torch.where(total > 0, student_entropy / safe_total, torch.full_like(total, 0.5))
    return 1.0 - w_reverse, w_reverse


@LOSSES.register(
    "bdkd",
    summary="BD-KD: per-sample entropy-balanced forward + reverse KL for the student (Amara et al. 2022).",
)
def bdkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    detach_weights: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Balanced-divergence student loss of BD-KD: entropy-weighted forward and reverse KL.

    Per position, with ``p_T = softmax(z_t / T)``, ``p_S = softmax(z_s / T)`` and their entropies
    ``H_T``, ``H_S``::

        w_rev = H_S / (H_S + H_T),   w_fwd = H_T / (H_S + H_T)     (0.5 / 0.5 if both are 0)
        loss  = T^2 * (w_fwd * KL(p_T || p_S) + w_rev * KL(p_S || p_T))

    What the paper states (abstract, v2): the student's distillation loss balances the forward
    KL (mode covering, softens an over-confident student) and the reverse KL (mode seeking,
    sharpens an under-confident one) with *sample-wise* weights that depend on the entropies of
    the student and teacher predictions, to improve accuracy and calibration. The exact weighting
    function could not be read from the sources available to us, so the rule above is our
    choice: it is hyper-parameter free, keeps ``w_fwd + w_rev = 1``, gives equal weights at equal
    entropies and puts the weight on the reverse KL exactly when ``H_S > H_T``. The weights are
    computed without gradient (``detach_weights=True``, treating them as per-sample coefficients
    as a sample-wise weighting does); ``detach_weights=False`` lets the student's gradient flow
    through ``H_S`` too. The ``T^2`` factor is Hinton's. BD-KD's teacher-side loss (for online
    distillation) is a separate term: this function is the student's loss, the teacher is
    detached. Both KLs are ``>= 0`` and vanish when the distributions are equal, so the loss does
    too. Float32; see :mod:`distill.losses._common` for ``mask`` and ``reduction``.
    """
    student_log_probs, teacher_log_probs, mask, leading_shape = log_probs_of_valid_rows(
        student_logits, teacher_logits, temperature, mask
    )
    forward = kl_rows(teacher_log_probs, student_log_probs)
    reverse = kl_rows(student_log_probs, teacher_log_probs)
    student_entropy = entropy(student_log_probs.detach() if detach_weights else student_log_probs)
    w_forward, w_reverse = balance_weights(student_entropy, entropy(teacher_log_probs))
    per_row = (w_forward * forward + w_reverse * reverse) * (temperature**2)
    return reduce_rows(per_row, mask, leading_shape, reduction)
