"""DAC-KL: forward KL to the teacher distribution clipped to its semantically dense region.

Reference: X. Liu, Y. Zhang, W. Li, S. Li, X. Huang, H. Chen, Y. Tang, J. Hu, Z. Xiong, Y. Wang,
"Multi-Granularity Semantic Revision for Large Language Model Distillation", arXiv 2407.10068
(2024), section on the distribution adaptive clipping Kullback-Leibler (DAC-KL) loss.
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


def dense_region(
    teacher_probs: torch.Tensor, *, lower_quantile: float, upper_quantile: float, keep_top1: bool
) -> torch.Tensor:
    """Boolean ``[P, C]``: the classes kept by the clipping of :func:`dac_kl`.

    Classes are sorted by teacher probability, largest first; class ``k`` occupies the interval
    ``[m_k, m_k + p_k)`` of cumulative mass, ``m_k`` the mass of the classes before it. It is kept
    when that interval meets the window ``[lower_quantile, upper_quantile]``:
    ``m_k < upper_quantile`` and ``m_k + p_k > lower_quantile``. ``[0, 1]`` keeps every class.
    The teacher's top class is added back when ``keep_top1`` (or when nothing else is kept).
    """
    if lower_quantile <= 0.0 and upper_quantile >= 1.0:
        return torch.ones_like(teacher_probs, dtype=torch.bool)
    sorted_probs, order = teacher_probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = (mass_before < upper_quantile) & (mass_before + sorted_probs > lower_quantile)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    top1 = torch.zeros_like(keep).scatter(-1, order[..., :1], True)
    add_top1 = top1 if keep_top1 else top1 & ~keep.any(dim=-1, keepdim=True)
    return keep | add_top1


@LOSSES.register(
    "dac_kl",
    summary="DAC-KL: forward KL to the teacher distribution clipped to its dense cumulative-mass window (MGSR, 2024).",
)
def dac_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    lower_quantile: float = 0.0,
    upper_quantile: float = 0.95,
    keep_top1: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distribution-adaptive-clipping KL (DAC-KL) with fixed clipping quantiles.

    In the paper (Liu et al. 2024) a small learnable MLP reads the teacher's output distribution
    and predicts an upper and a lower quantile limit ``(u, l)``; only the teacher's probabilities
    inside that range (its "semantically dense" region) are distilled, which removes the long
    tail of redundant low-probability tokens. A loss function here has no parameters, so the
    limits are the hyper-parameters ``lower_quantile`` / ``upper_quantile`` (learn them outside
    if wanted); the sub-network's architecture is not specified in the paper.

    The rule implemented (our reading; the paper's equations were not available to us, see
    :func:`dense_region`): with ``p = softmax(z_t / T)`` sorted in decreasing order, keep the
    classes whose cumulative-mass interval meets ``[lower_quantile, upper_quantile]``. With the
    defaults ``[0, 0.95]`` this is the smallest set of top classes holding 95% of the mass (a
    nucleus); ``lower_quantile > 0`` also clips the head, and ``keep_top1`` then keeps the
    teacher's top class anyway. The clipped teacher ``p̃ = p * keep / sum(p * keep)`` is compared
    with the student's *full* distribution ``q = softmax(z_s / T)``::

        loss = T^2 * sum_{c kept} p̃_c (log p̃_c - log q_c)

    which is ``>= -log q(kept) >= 0`` (it also pushes the student's mass onto the kept region;
    renormalizing the student over the kept classes too would make the loss vanish whenever
    one class is kept). It is 0 only when ``q = p̃``, so not at ``student == teacher`` unless
    nothing is clipped. ``lower_quantile=0, upper_quantile=1`` disables the clipping: the loss
    is then exactly the forward KL of :func:`distill.losses.hinton_kd` at the same temperature.
    Teacher detached; float32; see :mod:`distill.losses._common` for ``mask`` and ``reduction``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    if not 0.0 <= lower_quantile < upper_quantile <= 1.0:
        raise ValueError(
            f"need 0 <= lower_quantile < upper_quantile <= 1, got lower_quantile={lower_quantile}, "
            f"upper_quantile={upper_quantile}"
        )
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    student_log_probs = F.log_softmax(as_float32(student_rows) / temperature, dim=-1)
    teacher_scaled = as_float32(teacher_rows).to(student_log_probs.dtype) / temperature
    keep = dense_region(
        F.softmax(teacher_scaled, dim=-1),
        lower_quantile=lower_quantile,
        upper_quantile=upper_quantile,
        keep_top1=keep_top1,
    )
    # log of the clipped, renormalized teacher: a log-softmax over the kept classes only
    teacher_log_probs = F.log_softmax(teacher_scaled.masked_fill(~keep, torch.finfo(teacher_scaled.dtype).min), dim=-1)
    terms = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)
    per_row = torch.where(keep, terms, 0.0).sum(dim=-1).clamp_min(0.0) * (temperature**2)
    return reduce_rows(per_row, mask, leading_shape, reduction)
