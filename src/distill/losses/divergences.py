"""Divergences between the teacher's and the student's output distributions.

Every loss here compares ``p = softmax(z_t / T)`` (the teacher, detached) with
``q = softmax(z_s / T)`` (the student) at each position of logits ``[..., C]`` and follows the
conventions of :mod:`distill.losses._common`: valid positions are selected first, everything is
computed in float32 (float64 kept), ``mask``/``reduction`` as documented there. Unlike
:func:`distill.losses.hinton_kd`, none of these multiplies by ``T^2``; put that in the term's
weight if wanted. Mixtures are formed in log space (``logsumexp``) so that no probability is
exponentiated and logged again, and every divergence is clamped at 0 per position to remove the
tiny negative values rounding can leave when ``p == q``.

References:

* S. Kullback, R. A. Leibler, "On Information and Sufficiency", 1951 (KL divergence).
* J. Lin, "Divergence Measures Based on the Shannon Entropy", IEEE Trans. Inf. Theory 1991 (JS).
* R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024 (GKD),
  eq. 1: the generalized JSD.
* J. Ko, S. Kim, T. Chen, S.-Y. Yun, "DistiLLM: Towards Streamlined Distillation for Large
  Language Models", ICML 2024: the skew KL and skew reverse KL.
"""

from __future__ import annotations

import math

import torch

from distill.losses._common import log_probs_of_valid_rows, reduce_rows
from distill.losses.kd import kl_per_position
from distill.registry import LOSSES


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` from ``log a`` and ``log b``, by ``logsumexp``.

    ``weight_a`` of exactly 0 or 1 returns ``log_b`` or ``log_a`` itself (no ``log 0``). Gradient
    flows into both components.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logsumexp(
        torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0
    )


def _check_unit_interval(name: str, value: float, *, include_one: bool) -> None:
    upper_ok = value <= 1.0 if include_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


@LOSSES.register("forward_kl", summary="Forward KL(teacher || student) at temperature T, no T^2 factor.")
def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Forward (mode-covering) KL divergence ``KL(p || q) = sum_c p_c (log p_c - log q_c)``.

    ``p = softmax(z_t / T)`` is the teacher, ``q = softmax(z_s / T)`` the student (Kullback &
    Leibler 1951; the soft-target term of Hinton et al. 2015, section 2, without its ``T^2`` factor).
    Per position, clamped at 0; teacher detached; float32.
    """
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    return reduce_rows(kl_per_position(log_p, log_q), mask, leading_shape, reduction)


@LOSSES.register("reverse_kl", summary="Reverse KL(student || teacher) at temperature T (mode-seeking).")
def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Reverse (mode-seeking) KL divergence ``KL(q || p) = sum_c q_c (log q_c - log p_c)``.

    ``q = softmax(z_s / T)`` is the student, ``p = softmax(z_t / T)`` the teacher (as used for LLM
    distillation by Gu et al. 2024, MiniLLM, and Agarwal et al. 2024, GKD). Per position, clamped
    at 0; teacher detached; float32; no ``T^2`` factor.
    """
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    return reduce_rows(kl_per_position(log_q, log_p), mask, leading_shape, reduction)


@LOSSES.register("symmetric_kl", summary="Jeffreys divergence KL(p||q) + KL(q||p), summed (not averaged).")
def symmetric_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Symmetric KL (Jeffreys divergence) ``KL(p || q) + KL(q || p)``: the **sum** of both directions.

    Equal to ``sum_c (p_c - q_c)(log p_c - log q_c)``; twice the average of the two directions
    (scale with the term's weight for the average). ``p`` teacher, ``q`` student at temperature
    ``T``; each direction clamped at 0 per position; no ``T^2`` factor.
    """
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    per_row = kl_per_position(log_p, log_q) + kl_per_position(log_q, log_p)
    return reduce_rows(per_row, mask, leading_shape, reduction)


@LOSSES.register("jensen_shannon", summary="Jensen-Shannon divergence 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2.")
def jensen_shannon(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Jensen-Shannon divergence (Lin 1991), in nats: ``1/2 KL(p || m) + 1/2 KL(q || m)``, ``m = (p + q) / 2``.

    ``log m = logsumexp(log p + log 1/2, log q + log 1/2)``, so ``m`` is never formed in
    probability space. Symmetric in ``p`` and ``q``, bounded by ``log 2``; the square of SciPy's
    ``jensenshannon`` distance. Equals :func:`generalized_jsd` at ``beta = 0.5``.
    """
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    log_m = log_mixture(log_p, log_q, 0.5)
    per_row = 0.5 * kl_per_position(log_p, log_m) + 0.5 * kl_per_position(log_q, log_m)
    return reduce_rows(per_row, mask, leading_shape, reduction)


@LOSSES.register(
    "generalized_jsd",
    summary="GKD generalized JSD(beta): beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q (Agarwal et al. 2024).",
)
def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), ``P`` = teacher.

    ``JSD(beta)(p || q) = beta KL(p || M) + (1 - beta) KL(q || M)`` with ``M = beta p + (1 - beta) q``,
    ``p = softmax(z_t / T)`` the teacher and ``q = softmax(z_s / T)`` the student: ``beta``
    weights the **teacher** both in the mixture and in front of ``KL(p || M)``. This is exactly what
    TRL's ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta,
    temperature=T)`` computes per position (its mixture is ``logsumexp(log q + log(1 - beta),
    log p + log beta)``), before its reduction; TRL neither clamps nor multiplies by ``T^2``, and
    neither does this function except for the clamp at 0.

    Limits: for small ``beta``, ``JSD(beta) = beta KL(p || q) + O(beta^2)`` (forward KL, scaled by
    ``beta``); for ``beta`` near 1, ``JSD(beta) = (1 - beta) KL(q || p) + O((1 - beta)^2)`` (reverse
    KL, scaled by ``1 - beta``). At ``beta`` exactly 0 or 1 the mixture degenerates and the formula
    is identically 0, so, like TRL, ``beta == 0`` returns :func:`forward_kl` and ``beta == 1``
    returns :func:`reverse_kl` (unscaled; the loss is therefore discontinuous at the two
    endpoints). ``beta = 0.5`` is :func:`jensen_shannon`. ``beta`` outside ``[0, 1]`` raises.
    """
    _check_unit_interval("beta", beta, include_one=True)
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    if beta == 0.0:
        per_row = kl_per_position(log_p, log_q)
    elif beta == 1.0:
        per_row = kl_per_position(log_q, log_p)
    else:
        log_m = log_mixture(log_p, log_q, beta)
        per_row = beta * kl_per_position(log_p, log_m) + (1.0 - beta) * kl_per_position(log_q, log_m)
    return reduce_rows(per_row, mask, leading_shape, reduction)


@LOSSES.register(
    "skew_forward_kl", summary="DistiLLM skew KL: KL(p || alpha p + (1-alpha) q) (Ko et al. 2024)."
)
def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """alpha-skew KL of DistiLLM (Ko et al. 2024): ``SKL(alpha) = KL(p || alpha p + (1 - alpha) q)``.

    ``p`` teacher, ``q`` student at temperature ``T``. This is the definition of the paper and of
    its code (``skewed_forward_kl`` in jongwooko/distillm, ``distillm/losses.py``, where
    ``mixed = lam * teacher + (1 - lam) * student``). The reference code returns the cross-entropy
    ``-sum p log M``, which differs from this KL by the teacher's entropy, a constant: same
    gradient, but this value is a divergence (>= 0, 0 when ``p == q``). As in that code the
    gradient flows through the student part of the mixture (``M`` is not detached).
    ``alpha = 0`` is :func:`forward_kl`; ``alpha`` must be in ``[0, 1)`` (at 1 the loss is
    identically 0).
    """
    _check_unit_interval("alpha", alpha, include_one=False)
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    log_m = log_mixture(log_p, log_q, alpha)
    return reduce_rows(kl_per_position(log_p, log_m), mask, leading_shape, reduction)


@LOSSES.register(
    "skew_reverse_kl", summary="DistiLLM skew reverse KL: KL(q || (1-alpha) p + alpha q) (Ko et al. 2024)."
)
def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """alpha-skew reverse KL of DistiLLM (Ko et al. 2024): ``SRKL(alpha) = KL(q || (1 - alpha) p + alpha q)``.

    ``q`` student, ``p`` teacher at temperature ``T``. This is the definition of the paper and of
    its code (``skewed_reverse_kl`` in jongwooko/distillm, ``distillm/losses.py``:
    ``mixed = (1 - lam) * teacher + lam * student``, loss ``sum q (log q - log mixed)``). Gradient
    flows through ``q`` in both arguments, including the student part of the mixture, as there.
    ``alpha = 0`` is :func:`reverse_kl`; ``alpha`` must be in ``[0, 1)``.
    """
    _check_unit_interval("alpha", alpha, include_one=False)
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    log_m = log_mixture(log_q, log_p, alpha)
    return reduce_rows(kl_per_position(log_q, log_m), mask, leading_shape, reduction)


@LOSSES.register("total_variation", summary="Total variation distance 1/2 sum |p - q| at temperature T.")
def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Total variation distance ``TVD(p, q) = 1/2 sum_c |p_c - q_c|`` per position, in ``[0, 1]``.

    ``p`` teacher, ``q`` student at temperature ``T`` (used as a distillation loss by Wen et al.
    2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation", and in DistiLLM's
    code as ``tv_distance``). Symmetric; teacher detached; float32.
    """
    log_q, log_p, mask, leading_shape = log_probs_of_valid_rows(student_logits, teacher_logits, temperature, mask)
    per_row = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    return reduce_rows(per_row, mask, leading_shape, reduction)
