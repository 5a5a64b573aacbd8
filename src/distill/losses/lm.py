"""Losses made for language models: the fused chunked token-level loss as an objective term, and
a cosine loss for hidden-state distillation.

``fused_kd`` reads the final hidden states and output projections of both models (sources
``student.last_hidden``, ``student.lm_head``, ``teacher.last_hidden``, ``teacher.lm_head``), so a
step that uses it never builds the ``[tokens, vocab]`` logits at all; see
:mod:`distill.losses.chunked`. In YAML::

    terms:
      - name: kd
        loss: fused_kd
        params: {divergence: generalized_jsd, params: {beta: 0.5}, ce_weight: 0.0}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32, reduce_rows, valid_mask, valid_rows
from distill.losses.chunked import fused_linear_distill
from distill.registry import LOSSES


@LOSSES.register(
    "fused_kd",
    summary="Token-level KD (any fused divergence, optional CE) from hidden states and lm_head weights, in chunks.",
)
def fused_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    params: dict[str, Any] | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_rows: int | None = None,
    compile: bool = False,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``kd_weight * divergence(z_s, z_t) + ce_weight * CE(z_s, labels)`` per valid token, with
    ``z = hidden @ lm_head.T``, computed chunk by chunk by :func:`fused_linear_distill` (same value
    and gradients as the dense losses of the same names; the chunked scheme follows Liger-Kernel's
    fused linear losses, Hsu et al. 2024).

    ``divergence`` is one of :data:`distill.losses.chunked.DIVERGENCES` with its keyword ``params``
    (``temperature``, ``beta``, ``alpha``, TAID's fixed ``t``). Valid tokens: ``mask`` and
    ``labels != -100``. ``reduction`` ``batchmean`` or ``sum`` (the engine uses ``sum`` and divides
    by the whole optimizer step's token count). ``compile=True`` fuses the elementwise work with
    ``torch.compile`` (much faster on CPUs; the first call compiles).
    """
    return fused_linear_distill(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels,
        divergence=divergence,
        params=params,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        mask=mask,
        reduction=reduction,
        chunk_rows=chunk_rows,
        compile=compile,
    )


@LOSSES.register("feature_cosine", summary="1 - cosine similarity of student and teacher features per position.")
def feature_cosine(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    eps: float = 1e-8,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``1 - cos(u_s, u_t)`` per position: the cosine hidden-state loss of DistilBERT (Sanh et al.,
    "DistilBERT, a distilled version of BERT", 2019, its cosine embedding loss) and of
    layer-mapped hidden-state distillation.

    Positions as in :func:`distill.losses.features.feature_mse`: ``[B, T, D]`` is read as ``[B, T]``
    tokens (``mask`` ``[B, T]``), any other ``[B, ...]`` as one vector per sample. Both tensors must
    have the same shape (put an adapter on the student's source for a learned projection). The
    value lies in ``[0, 2]`` and is 0 when the vectors point the same way, whatever their norms.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature_cosine: student_features {tuple(student_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must have the same shape; map the student's source with an adapter"
        )
    if student_features.dim() < 2:
        raise ValueError(f"feature_cosine: features need shape [B, ...], got {tuple(student_features.shape)}")
    leading = 2 if student_features.dim() == 3 else 1
    leading_shape = student_features.shape[:leading]
    mask = valid_mask(mask, leading_shape, student_features.device)
    student_rows, teacher_rows = valid_rows(mask, student_features, teacher_features.detach(), leading_dims=leading)
    student_rows = as_float32(student_rows).flatten(1)
    teacher_rows = as_float32(teacher_rows).flatten(1).to(student_rows.dtype)
    per_row = 1.0 - F.cosine_similarity(student_rows, teacher_rows, dim=-1, eps=eps)
    return reduce_rows(per_row, mask, leading_shape, reduction)
