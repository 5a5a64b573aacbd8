"""G2SD's generic distillation: predict the teacher's token features of hidden patches.

Reference: W. Huang, Z. Peng, L. Dong, F. Wei, J. Jiao, Q. Ye, "Generic-to-Specific Distillation
of Masked Autoencoders", CVPR 2023 (arXiv 2302.14771).

G2SD distils in two stages. In the *generic* stage a small ViT sees images with most patches
hidden, and a light decoder on top of it predicts the large model's hidden token representations,
"so that task-agnostic knowledge can be transferred"; in the *specific* stage the small model is
fine-tuned with logit distillation on the task. Here the generic stage is an ordinary stage with
``input_mask`` (random patches of the student's input zeroed; ``batch.patch_mask`` says which),
a ``decoder`` adapter on the student's tokens, and this loss; the specific stage is a second
stage with ``init_from`` the first and a logit loss (``hinton_kd``). Per sample ``b``::

    l_b = mean_{i hidden} || d_{b,i} - norm(t_{b,i}) ||^2 + visible_weight * mean_{i visible} || d_{b,i} - norm(t_{b,i}) ||^2

with ``d`` the decoder's predictions and ``t`` the teacher's tokens (teacher on the full image),
``norm`` a per-token standardization (layer norm without affine parameters, ``normalize_target``,
as MAE's normalized targets) and ``||.||^2`` summed over the feature dimension. Tokens before the
patch tokens (a class token) are ignored: with ``N`` tokens and ``P`` patches, the last ``P``
tokens are the patches, in the row-major order of ``batch.patch_mask``.

Choices where the abstract leaves room (configurable): the student *sees* the masked image with
hidden patches zeroed (SimMIM-style) rather than dropping them from its token sequence (MAE-style),
so that any student architecture can be used; the teacher sees the full image; the loss covers
the hidden patches (``visible_weight=0``) by default. ``mask``/``reduction`` as in
:mod:`distill.losses._common` (one position per sample); float32; teacher detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32, reduce_rows, valid_mask, valid_rows
from distill.registry import LOSSES


@LOSSES.register(
    "masked_feature_mse",
    summary="G2SD generic distillation: predict the teacher's token features of the hidden patches.",
    inputs="tokens",
)
def masked_feature_mse(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    patch_mask: torch.Tensor,
    *,
    visible_weight: float = 0.0,
    normalize_target: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """G2SD's generic loss (Huang et al., CVPR 2023) on tokens ``[B, N, D]`` and ``patch_mask`` ``[B, P]``.

    ``student_features`` are the decoder's predictions (``student.<path>.output -> decoder``),
    ``teacher_features`` the teacher's tokens of the same shape, ``patch_mask`` True where the
    student's patch was hidden (``batch.patch_mask``); see the module docstring for the equation.
    """
    if student_features.shape != teacher_features.shape or student_features.dim() != 3:
        raise ValueError(
            f"masked_feature_mse needs student and teacher tokens of one shape [B, N, D]; got "
            f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)} (put a decoder adapter on the student)"
        )
    batch, tokens, _ = student_features.shape
    if patch_mask.dim() != 2 or patch_mask.shape[0] != batch or patch_mask.shape[1] > tokens:
        raise ValueError(
            f"patch_mask must be [B, P] with P <= tokens ({tokens}); got {tuple(patch_mask.shape)}"
        )
    if visible_weight < 0:
        raise ValueError(f"visible_weight must be >= 0, got {visible_weight}")
    patches = patch_mask.shape[1]
    rows_mask = valid_mask(mask, torch.Size([batch]), student_features.device)
    student, teacher, hidden = valid_rows(
        rows_mask, as_float32(student_features)[:, tokens - patches :], as_float32(teacher_features)[:, tokens - patches :].detach(),
        patch_mask.to(student_features.device, torch.bool), leading_dims=1,
    )
    if normalize_target:
        teacher = F.layer_norm(teacher, teacher.shape[-1:], eps=1e-6)
    error = (student - teacher).pow(2).sum(-1)  # [P_valid, patches]
    hidden_f = hidden.to(error.dtype)
    visible_f = 1.0 - hidden_f
    per_sample = (error * hidden_f).sum(-1) / hidden_f.sum(-1).clamp_min(1.0)
    if visible_weight:
        per_sample = per_sample + visible_weight * (error * visible_f).sum(-1) / visible_f.sum(-1).clamp_min(1.0)
    return reduce_rows(per_sample, rows_mask, torch.Size([batch]), reduction)
