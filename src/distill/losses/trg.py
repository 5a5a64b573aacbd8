"""TRG: knowledge distillation via a token-level relationship graph, plus a contextual loss.

Reference: S. Zhang, H. Liu, K. He, "Knowledge Distillation via Token-level Relationship Graph",
arXiv 2306.12442 (2023).

TRG distils the *relations between tokens* (patch embeddings of a ViT, or the positions of a CNN
map read as tokens) instead of the tokens themselves: a graph whose nodes are tokens and whose
edges are their similarities, within an image and across the images of a batch, plus a
"token-wise contextual loss" that makes the student capture the teacher's inner-instance semantic
context. The abstract fixes these three parts; the full text and code were not at hand, so the
exact form below is this implementation's, each part configurable by its weight.

For student tokens ``S_b`` ``[N, D_s]`` and teacher tokens ``T_b`` ``[N, D_t]`` of image ``b`` (the
valid images ``b = 1..P`` of the batch), tokens are L2-normalised and compared by cosine
similarity, each model in its own space (so ``D_s`` and ``D_t`` may differ for the graph terms):

* **Intra-instance graph.** Row ``i`` of the graph of image ``b`` is the distribution over the
  *other* tokens of the image, ``P_b[i, j] = softmax_{j != i}(cos(x_i, x_j) / tau)``. Per image,
  ``L_intra,b = mean_i KL(P^t_b[i] || P^s_b[i])``.
* **Inter-instance graph.** The same, with rows the tokens of image ``b`` and columns the tokens
  of every *other* valid image of the batch: ``L_inter,b = mean_i KL(Q^t_b[i] || Q^s_b[i])``. To
  bound its ``(P k)^2`` memory, each image contributes ``k = min(inter_tokens, N)`` tokens at evenly
  spaced indices (the same for student and teacher; index 0, a CLS token, is always among them);
  ``inter_tokens=None`` uses every token.
* **Contextual loss** (Mechrez, Talmi, Zelnik-Manor, "The Contextual Loss for Image
  Transformation with Non-Aligned Data", ECCV 2018), between the student's and the teacher's token
  sets of the same image (this term needs ``D_s = D_t``)::

      d_ij = 1 - cos(x_i - mu_t, y_j - mu_t)          (mu_t: mean teacher token of the image)
      d~_ij = d_ij / (min_k d_ik + 1e-5),   CX_ij = softmax_j((1 - d~_ij) / h)
      L_context,b = -log( mean_j max_i CX_ij )

  It is 0 when every teacher token has a student token that matches it closely, whatever the
  order of the tokens: a set-level, order-free match of each image's token context.

Per image ``l_b = intra_weight L_intra,b + inter_weight L_inter,b + context_weight L_context,b``;
``reduction`` over the valid images (``batchmean`` = mean). Every part is 0 when the student's
tokens equal the teacher's and is invariant to a permutation of the tokens applied to both
(with ``inter_tokens=None``, or ``N <= inter_tokens``, for the inter-instance part). No ``T^2``
factor. Fewer than 2 tokens give no intra graph, fewer than 2 valid images no inter graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    REDUCTIONS,
    as_float32,
    check_temperature,
    kl_rows,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES

_EXCLUDED = -1e9
"""Logit of an excluded edge: ``exp`` underflows to exactly 0, ``log_softmax`` stays finite."""


def _graph_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per row, with the ``excluded`` edges removed."""
    student_log_probs = F.log_softmax(student_logits.masked_fill(excluded, _EXCLUDED), dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.masked_fill(excluded, _EXCLUDED), dim=-1)
    return kl_rows(teacher_log_probs, student_log_probs)


def intra_graph_loss(student_unit: torch.Tensor, teacher_unit: torch.Tensor, temperature: float) -> torch.Tensor:
    """``L_intra`` per image ``[P]`` from unit tokens ``[P, N, D_s]``, ``[P, N, D_t]``."""
    tokens = student_unit.shape[1]
    if tokens < 2:
        return student_unit.flatten(1)[:, :0].sum(dim=-1)
    eye = torch.eye(tokens, dtype=torch.bool, device=student_unit.device)
    student_sim = student_unit @ student_unit.transpose(1, 2) / temperature
    teacher_sim = teacher_unit @ teacher_unit.transpose(1, 2) / temperature
    return _graph_kl(student_sim, teacher_sim, eye).mean(dim=-1)


def inter_graph_loss(
    student_unit: torch.Tensor, teacher_unit: torch.Tensor, temperature: float, inter_tokens: int | None
) -> torch.Tensor:
    """``L_inter`` per image ``[P]``: token rows of an image against the tokens of the other images."""
    images, tokens = student_unit.shape[:2]
    if images < 2:
        return student_unit.flatten(1)[:, :0].sum(dim=-1)
    if inter_tokens is not None and inter_tokens < tokens:
        index = torch.linspace(0, tokens - 1, inter_tokens, device=student_unit.device).round().long()
        student_unit, teacher_unit = student_unit[:, index], teacher_unit[:, index]
    kept = student_unit.shape[1]
    student_flat = student_unit.flatten(0, 1)
    teacher_flat = teacher_unit.flatten(0, 1)
    owner = torch.arange(images, device=student_unit.device).repeat_interleave(kept)
    same_image = owner.unsqueeze(0) == owner.unsqueeze(1)
    per_token = _graph_kl(student_flat @ student_flat.T / temperature, teacher_flat @ teacher_flat.T / temperature, same_image)
    return per_token.reshape(images, kept).mean(dim=-1)


def contextual_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Contextual loss (Mechrez et al., ECCV 2018) per image ``[P]`` between token sets ``[P, N, D]``."""
    center = teacher_tokens.mean(dim=1, keepdim=True)
    student_unit = F.normalize(student_tokens - center, dim=-1)
    teacher_unit = F.normalize(teacher_tokens - center, dim=-1)
    distance = (1.0 - student_unit @ teacher_unit.transpose(1, 2)).clamp_min(0.0)  # [P, N_s (i), N_t (j)]
    relative = distance / (distance.min(dim=-1, keepdim=True).values + 1e-5)
    context = F.softmax((1.0 - relative) / bandwidth, dim=-1)
    similarity = context.max(dim=1).values.mean(dim=-1)
    return -torch.log(similarity.clamp_min(torch.finfo(similarity.dtype).tiny))


@LOSSES.register(
    "trg",
    summary="TRG: token-graph KL within and across images plus a token contextual loss (Zhang et al. 2023).",
    inputs="tokens",
)
def trg(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    temperature: float = 0.1,
    intra_weight: float = 1.0,
    inter_weight: float = 1.0,
    context_weight: float = 1.0,
    context_bandwidth: float = 0.5,
    inter_tokens: int | None = 32,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """TRG (Zhang, Liu, He, "Knowledge Distillation via Token-level Relationship Graph", arXiv
    2306.12442, 2023): token-graph distillation within and across images plus a contextual loss.

    Per valid image ``b``: ``l_b = intra_weight L_intra,b + inter_weight L_inter,b +
    context_weight L_context,b`` (equations in the module docstring), with similarity
    temperature ``tau = temperature`` and contextual bandwidth ``h = context_bandwidth``. Inputs are
    token features ``[B, N, D_s]`` and ``[B, N, D_t]`` (same ``N``; ``D`` may differ unless
    ``context_weight != 0``); ``mask`` is ``[B]``.
    """
    if student_features.dim() != 3 or teacher_features.dim() != 3 or student_features.shape[:2] != teacher_features.shape[:2]:
        raise ValueError(
            f"trg: expects token features [B, N, D] with the same B and N; got student {tuple(student_features.shape)} "
            f"and teacher {tuple(teacher_features.shape)}"
        )
    if context_weight != 0 and student_features.shape[-1] != teacher_features.shape[-1]:
        raise ValueError(
            f"trg: the contextual loss compares student and teacher tokens directly, so their dims must match "
            f"(student {tuple(student_features.shape)}, teacher {tuple(teacher_features.shape)}); put an adapter "
            "on the student's source, or set context_weight: 0"
        )
    check_temperature(temperature)
    if not context_bandwidth > 0:
        raise ValueError(f"trg: context_bandwidth must be > 0, got {context_bandwidth}")
    if inter_tokens is not None and inter_tokens < 1:
        raise ValueError(f"trg: inter_tokens must be >= 1 or None, got {inter_tokens}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")
    leading_shape = student_features.shape[:1]
    mask = valid_mask(mask, leading_shape, student_features.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_features, teacher_features.detach().to(student_features.device), leading_dims=1
    )
    student_rows = as_float32(student_rows)
    teacher_rows = as_float32(teacher_rows).to(student_rows.dtype)
    per_row = student_rows.flatten(1)[:, :0].sum(dim=-1)
    student_unit = F.normalize(student_rows, dim=-1)
    teacher_unit = F.normalize(teacher_rows, dim=-1)
    if intra_weight != 0:
        per_row = per_row + intra_weight * intra_graph_loss(student_unit, teacher_unit, temperature)
    if inter_weight != 0:
        per_row = per_row + inter_weight * inter_graph_loss(student_unit, teacher_unit, temperature, inter_tokens)
    if context_weight != 0 and student_rows.shape[0] > 0:
        per_row = per_row + context_weight * contextual_loss(student_rows, teacher_rows, context_bandwidth)
    return reduce_rows(per_row, mask, leading_shape, reduction)


__all__ = ["contextual_loss", "inter_graph_loss", "intra_graph_loss", "trg"]
