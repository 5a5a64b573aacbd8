"""Swing distillation: privacy-preserving KD with per-position temperatures and noisy soft targets.

Reference: J. Li, X. Wu, W. Dong, S. Wu, C. Bian, D. Xiong, "Swing Distillation: A
Privacy-Preserving Knowledge Distillation Framework", arXiv 2212.08349, 2022.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_logits,
    check_temperature,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES

PRIVACY_SCORES: tuple[str, ...] = ("label", "max")
NOISES: tuple[str, ...] = ("gaussian", "laplace")


def swing_temperatures(
    privacy_likelihood: torch.Tensor, *, temperature: float, max_temperature: float, threshold: float
) -> torch.Tensor:
    """Per-position temperature from a privacy likelihood in ``[0, 1]``.

    ``T_i = temperature + (max_temperature - temperature) * clamp((s_i - threshold) / (1 - threshold), 0, 1)``:
    ``temperature`` where ``s_i <= threshold``, rising linearly to ``max_temperature`` at ``s_i = 1``.
    """
    ramp = ((privacy_likelihood - threshold) / (1.0 - threshold)).clamp(0.0, 1.0)
    return temperature + (max_temperature - temperature) * ramp


def _noise(shape: torch.Size, kind: str, scale: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    if kind == "gaussian":
        sample = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    else:  # Laplace(0, 1) by the inverse CDF of a uniform on [-1/2, 1/2)
        uniform = torch.rand(shape, generator=generator, device=device, dtype=like.dtype) - 0.5
        tail = (1.0 - 2.0 * uniform.abs()).clamp_min(torch.finfo(like.dtype).tiny)
        sample = -torch.sign(uniform) * torch.log(tail)
    return (scale * sample).to(like.device)


def noisy_soft_targets(
    probs: torch.Tensor, *, noise: str, noise_scale: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``probs + noise``, clipped at 0 and renormalized; a row whose noise clips every entry keeps ``probs``."""
    noisy = (probs + _noise(probs.shape, noise, noise_scale, probs, generator)).clamp_min(0.0)
    total = noisy.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, noisy / torch.where(total > 0, total, torch.ones_like(total)), probs)


@LOSSES.register(
    "swing_kd",
    summary="Swing distillation: KD with per-token temperatures from the teacher's confidence and noisy soft targets.",
)
def swing_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    max_temperature: float = 8.0,
    privacy_score: str = "label",
    confidence_threshold: float = 0.0,
    noise: str = "gaussian",
    noise_scale: float = 0.01,
    training: bool = True,
    generator: torch.Generator | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Swing distillation (Li et al. 2022): adaptive per-position temperature plus noisy soft targets.

    What the paper states (abstract): the temperature is not a constant but is assigned per
    token "according to the likelihood that a token in a position contains private
    information", and noise is injected into the soft targets given to the student. The exact
    formulas could not be read from the sources available to us; this function implements the
    following, every piece configurable:

    1. Privacy likelihood ``s_i`` (no gradient): the teacher's probability at temperature 1 of
       the position's label (``privacy_score="label"``; memorized private strings such as
       canaries are exactly the tokens a teacher predicts with abnormal confidence) or its top
       probability (``"max"``, which ignores ``labels`` except for ``ignore_index``).
    2. Temperature: ``T_i = temperature + (max_temperature - temperature) * r_i`` with
       ``r_i = clamp((s_i - confidence_threshold) / (1 - confidence_threshold), 0, 1)``: higher
       (flatter soft targets, less of the teacher's private certainty transferred) where the
       teacher is confident. ``max_temperature = temperature`` gives plain KD at a fixed T.
    3. Soft targets ``p_i = softmax(z_t,i / T_i)``; in training (``training=True``) and for
       ``noise_scale > 0``: ``p̃_i = normalize(max(p_i + noise, 0))`` with i.i.d. ``noise``
       ``N(0, noise_scale^2)`` (``"gaussian"``) or ``Laplace(0, noise_scale)`` (``"laplace"``,
       the differential-privacy mechanism) per class, drawn from ``generator`` when given
       (reproducible). The noise is added in probability space as the paper describes; its
       relative effect grows with the number of classes, so scale ``noise_scale`` with ``C``.
       With ``training=False`` no noise is added.
    4. Loss: ``T_i^2 * KL(p̃_i || softmax(z_s,i / T_i))``, Hinton's KD at each position's own
       temperature with its ``T^2`` factor.

    ``labels`` are integer indices ``[...]``; positions labelled ``ignore_index`` are masked. The
    teacher (temperatures and soft targets) gets no gradient; the value is ``>= 0`` and, without
    noise, 0 when student and teacher logits are equal. Float32; see
    :mod:`distill.losses._common` for ``mask`` and ``reduction``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    check_temperature(max_temperature)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but student_logits' leading dims are "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if privacy_score not in PRIVACY_SCORES:
        raise ValueError(f"privacy_score must be one of {PRIVACY_SCORES}, got '{privacy_score}'")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got '{noise}'")
    if not 0.0 <= confidence_threshold < 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    labels = labels.to(student_logits.device)
    label_valid = labels != ignore_index
    mask = label_valid if mask is None else (mask & label_valid)
    student_rows, teacher_rows, label_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), labels, leading_dims=len(leading_shape)
    )
    student_rows = as_float32(student_rows)
    teacher_rows = as_float32(teacher_rows).to(student_rows.dtype)
    with torch.no_grad():
        teacher_probs_t1 = F.softmax(teacher_rows, dim=-1)
        if privacy_score == "label":
            likelihood = teacher_probs_t1.gather(-1, label_rows.long().unsqueeze(-1)).squeeze(-1)
        else:
            likelihood = teacher_probs_t1.amax(dim=-1)
        temperatures = swing_temperatures(
            likelihood, temperature=temperature, max_temperature=max_temperature, threshold=confidence_threshold
        ).unsqueeze(-1)
        log_targets = F.log_softmax(teacher_rows / temperatures, dim=-1)
        soft_targets = log_targets.exp()
        if training and noise_scale > 0 and soft_targets.numel() > 0:
            soft_targets = noisy_soft_targets(soft_targets, noise=noise, noise_scale=noise_scale, generator=generator)
            log_targets = soft_targets.clamp_min(torch.finfo(soft_targets.dtype).tiny).log()
    student_log_probs = F.log_softmax(student_rows / temperatures, dim=-1)
    # entries with a zero target (clipped by the noise) contribute exactly 0 (0 * log 0 = 0)
    terms = torch.where(soft_targets > 0, soft_targets * (log_targets - student_log_probs), 0.0)
    kl = terms.sum(dim=-1).clamp_min(0.0)
    per_row = kl * temperatures.squeeze(-1) ** 2
    return reduce_rows(per_row, mask, leading_shape, reduction)
