"""KD^3's teacher-student instance selection for distilling on data from another distribution.

Reference: J. Tang, S. Chen, G. Niu, M. Sugiyama, C. Gong, "Distribution Shift Matters for Knowledge
Distillation with Webly Collected Images", ICCV 2023 (arXiv:2307.11469), section "teacher-student
dynamic instance selection". When the distillation data (e.g. images collected from the web) does
not come from the teacher's training distribution, KD^3 first *selects* the useful instances
according to the **combined predictions of the teacher and the student**, and distils on those only;
the selection is redone at every step with the current student ("dynamic").

What this module implements (the paper's other two components, feature/classifier alignment and
the MixDistribution contrastive block, are not part of it):

* combined prediction ``p_c = (1 - student_weight) * softmax(z_t) + student_weight * softmax(z_s)``
  (temperature 1; the student's part detached: selection passes no gradient);
* confidence ``c = max_k p_c[k]``;
* selection ``"threshold"``: keep a sample when ``c >= threshold``; ``"top_fraction"``: keep the
  ``round(keep * n)`` most confident of the ``n`` valid samples of the batch (ties broken by position);
* weights: 1 for kept samples (``soft=True``: ``c``), 0 for dropped ones;
* the distillation term is Hinton's ``T^2 KL(p_t^T || p_s^T)`` weighted per sample.

The exact threshold and weighting schedule of the paper could not be checked against its code;
the defaults (``student_weight = 0.5``, ``threshold = 0.5``) are our choices, not the paper's.
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

SELECTIONS: tuple[str, ...] = ("threshold", "top_fraction")
NORMALIZATIONS: tuple[str, ...] = ("kept", "valid")


def _check_options(threshold: float, student_weight: float, selection: str, keep: float) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got '{selection}'")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= student_weight <= 1.0:
        raise ValueError(f"student_weight must be in [0, 1], got {student_weight}")
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")


def _row_weights(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    threshold: float,
    student_weight: float,
    selection: str,
    keep: float,
    soft: bool,
) -> torch.Tensor:
    """float32 weights ``[P]`` of valid rows ``[P, C]`` (no gradient)."""
    with torch.no_grad():
        teacher_probs = F.softmax(as_float32(teacher_rows.detach()).float(), dim=-1)
        student_probs = F.softmax(as_float32(student_rows.detach()).float(), dim=-1)
        combined = (1.0 - student_weight) * teacher_probs + student_weight * student_probs
        confidence = combined.max(dim=-1).values
        if selection == "threshold":
            kept = confidence >= threshold
        else:
            count = round(keep * confidence.shape[0])
            kept = torch.zeros_like(confidence, dtype=torch.bool)
            if count > 0:
                order = torch.sort(confidence, descending=True, stable=True).indices
                kept[order[:count]] = True
        weights = confidence if soft else torch.ones_like(confidence)
        return torch.where(kept, weights, torch.zeros_like(weights))


def kd3_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    threshold: float = 0.5,
    student_weight: float = 0.5,
    selection: str = "threshold",
    keep: float = 0.5,
    soft: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KD^3's per-sample weights ``[...]`` float32: 0 for dropped (and masked) samples, 1 for kept
    ones (``soft=True``: their combined confidence). See the module docstring for the rule.

    ``(weights > 0)`` over the valid positions is the kept set; :func:`kept_fraction` gives its share.
    """
    check_logits(student_logits, teacher_logits)
    _check_options(threshold, student_weight, selection, keep)
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(mask, student_logits, teacher_logits, leading_dims=len(leading_shape))
    weights = _row_weights(student_rows, teacher_rows, threshold, student_weight, selection, keep, soft)
    return reduce_rows(weights, mask, leading_shape, "none")


def kept_fraction(weights: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of the valid positions that :func:`kd3_weights` kept (0.0 when nothing is valid)."""
    kept = weights > 0
    if mask is not None:
        mask = mask.to(device=weights.device, dtype=torch.bool)
        valid = int(mask.sum())
        return float((kept & mask).sum()) / valid if valid else 0.0
    return float(kept.float().mean()) if kept.numel() else 0.0


@LOSSES.register(
    "kd3",
    summary="KD^3: Hinton KD on the samples that the combined teacher+student prediction is confident about (Tang et al. 2023).",
)
def kd3(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    threshold: float = 0.5,
    student_weight: float = 0.5,
    selection: str = "threshold",
    keep: float = 0.5,
    soft: bool = False,
    normalize: str = "kept",
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """KD^3's selected distillation term (Tang et al., ICCV 2023, teacher-student dynamic instance selection).

    Per position ``w * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, with ``w`` from
    :func:`kd3_weights` (``threshold``, ``student_weight``, ``selection``, ``keep``, ``soft``).
    Dropped samples act like masked ones: ``reduction="batchmean"`` divides by the total weight of
    the kept samples (``normalize="kept"``, the mean over the selected instances) or by the number of
    valid positions (``normalize="valid"``, so the term shrinks as fewer samples are kept); nothing
    kept gives 0 with a zero gradient. ``"sum"`` and ``"none"`` (0 at dropped and masked positions)
    as in :mod:`distill.losses._common`. The weights pass no gradient; the teacher is detached;
    computed in float32.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    _check_options(threshold, student_weight, selection, keep)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got '{normalize}'")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    weights = _row_weights(student_rows, teacher_rows, threshold, student_weight, selection, keep, soft)
    student_log_probs = F.log_softmax(as_float32(student_rows) / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(as_float32(teacher_rows) / temperature, dim=-1)
    per_row = kl_rows(teacher_log_probs, student_log_probs) * (temperature**2) * weights.to(student_log_probs.dtype)
    if reduction == "batchmean" and normalize == "kept":
        total = weights.sum().to(per_row.dtype)
        return per_row.sum() / torch.where(total > 0, total, torch.ones_like(total))
    return reduce_rows(per_row, mask, leading_shape, reduction)
