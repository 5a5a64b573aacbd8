"""OFA-KD loss: cross-entropy to the teacher's distribution with adaptive target enhancement.

Reference: Z. Hao, J. Guo, K. Han, Y. Tang, H. Hu, Y. Wang, C. Xu, "One-for-All: Bridge the Gap
Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023; official code
github.com/Hao840/OFAKD (``distillers/ofa.py``, ``ofa_loss``).

OFA-KD projects intermediate student features into the logit space with branches (adapters on
the student's sources here) and trains each branch's logits, and the student's own, with::

    l = - sum_c w_c log q_c,     q = softmax(z_s / T),  p = softmax(z_t / T)
    w_y = (1 + p_y)^eps - 1      (target class y)
    w_c = p_c^eps                (c != y)

the official ``ofa_loss``: ``prod = (p + onehot)^eps; loss = -sum((prod - onehot) * log q)``.
At ``eps = 1`` the weights are ``p`` itself and the loss is the plain soft cross-entropy
``-sum_c p_c log q_c`` (= ``KL(p || q) + H(p)``). For ``eps > 1`` the target's weight is enhanced
and the others' suppressed (``p_c^eps < p_c``), the more so the more confident the teacher is
(``((1 + p)^eps - 1) / p`` grows with ``p``): the "adaptive target enhancement" of the paper.
No ``T^2`` factor (the official code has none); positions whose label is ``ignore_index`` are
masked; computed in float32 (float64 kept); teacher detached.
"""

from __future__ import annotations

import torch

from distill.losses._common import (
    check_logits,
    check_temperature,
    log_probs_of_valid_rows,
    reduce_rows,
    valid_mask,
)
from distill.registry import LOSSES


def ofa_target_weights(teacher_log_probs: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """OFA's target weights ``w`` ``[P, C]`` from the teacher's log probabilities and labels ``[P]``.

    ``w_y = (1 + p_y)^eps - 1`` and ``w_c = p_c^eps``, computed in log space
    (``expm1(eps log1p(p_y))``, ``exp(eps log p_c)``) so small probabilities stay exact.
    """
    weights = torch.exp(eps * teacher_log_probs)
    target_log_prob = teacher_log_probs.gather(-1, labels.unsqueeze(-1))
    target_weight = torch.expm1(eps * torch.log1p(target_log_prob.exp()))
    return weights.scatter(-1, labels.unsqueeze(-1), target_weight)


@LOSSES.register(
    "ofa_loss",
    summary="OFA-KD: soft cross-entropy with adaptive target enhancement (1+p_y)^eps - 1 (Hao et al. 2023).",
)
def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    eps: float = 1.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """OFA-KD loss (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
    Knowledge Distillation", NeurIPS 2023, eq. 5-6 and the official ``ofa_loss``).

    Per position ``l = -sum_c w_c log softmax(z_s / T)_c`` with ``w_y = (1 + p_y)^eps - 1``,
    ``w_c = p_c^eps`` for ``c != y`` and ``p = softmax(z_t / T)`` (see the module docstring).
    ``eps = 1`` is the plain soft cross-entropy; ``eps > 1`` enhances the target class. Logits
    ``[..., C]``, labels ``[...]``; ``eps > 0``; no ``T^2``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    leading_shape = student_logits.shape[:-1]
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the logits' leading dims are {tuple(leading_shape)}"
        )
    labels = labels.to(student_logits.device)
    checked = valid_mask(mask, leading_shape, student_logits.device)
    label_valid = labels != ignore_index
    combined = label_valid if checked is None else (checked & label_valid)
    student_log_probs, teacher_log_probs, combined, _ = log_probs_of_valid_rows(
        student_logits, teacher_logits, temperature, combined
    )
    label_rows = labels[combined].long()
    weights = ofa_target_weights(teacher_log_probs.to(student_log_probs.dtype), label_rows, eps)
    per_row = -(weights * student_log_probs).sum(dim=-1)
    return reduce_rows(per_row, combined, leading_shape, reduction)


__all__ = ["ofa_loss", "ofa_target_weights"]
