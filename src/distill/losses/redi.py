"""REDI: Reinforcement Distillation from positive and negative teacher traces.

Reference: S. Xu, C. Peng, J. Long, W. Xu, W. Chu, Y. Qi, "Harnessing Negative Signals:
Reinforcement Distillation from Teacher Data for LLM Reasoning", 2025 (arXiv 2505.24850); official
code github.com/Tim-Siu/reinforcement-distillation (``trl/trl/trainer/dpo2_trainer.py``,
``loss_type == "reinforce"``; recipe ``experiments_trl/recipes/redi/redi_1_08_1e-6/config.yaml``).

Sequence-level losses on pairs. The data layout is the one of :mod:`distill.losses.preference`:

* ``student_logits`` ``[..., 2, T, V]`` (usually ``[B, 2, T, V]``): index 0 along the pair
  dimension is the positive (correct, "chosen") trace ``y+``, index 1 the negative (incorrect,
  "rejected") trace ``y-`` of the same prompt ``x``;
* ``labels`` ``[..., 2, T]``: shifted next-token targets, ``ignore_index`` (-100) where a position
  is no target (prompt, padding);
* ``mask`` ``[..., 2, T]`` (optional bool, True = valid).

A position counts when ``mask`` is True there and its label is a target; a trace's length ``|y|``
is its number of counted positions and ``log pi(y|x)`` the sum of the log-probabilities of its
counted targets. A pair counts when at least one of its two traces has a counted position.

**Unit: the sequence.** Every loss of this module has the attribute ``unit = "sequence"``: its value
is one number per pair, and its reductions are over pairs, not tokens:

* ``"sum"``: the sum over counted pairs of the per-pair losses;
* ``"batchmean"`` (alias ``"mean"``): that sum divided by the number of counted pairs;
* ``"none"``: the per-pair losses, shape ``[...]`` (the leading dims before the pair dimension),
  0 for pairs that do not count.

Under gradient accumulation the engine sums the ``"sum"`` values of a step's micro-batches and
divides by the step's number of counted pairs (:func:`count_pairs`), which equals the mean over
pairs of the whole step. Other conventions follow :mod:`distill.losses._common`: counted positions
are selected before any arithmetic, float32 (float64 kept), a fully masked input gives 0 and a
zero gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32
from distill.losses.preference import _check_pairs, _counted_positions
from distill.registry import LOSSES

SEQUENCE_UNIT = "sequence"
"""Value of a loss's ``unit`` attribute when it is normalised per sequence (pair), not per token."""

SEQUENCE_REDUCTIONS: tuple[str, ...] = ("batchmean", "mean", "sum", "none")
POSITIVE, NEGATIVE = 0, 1


def sequence_unit(loss: Any) -> Any:
    """Mark ``loss`` (a function or a module class) as normalised per sequence: ``loss.unit = "sequence"``."""
    loss.unit = SEQUENCE_UNIT
    return loss


def sequence_log_likelihoods(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-likelihood of its counted targets and its number of them.

    ``student_logits`` ``[..., T, V]``, ``labels`` and ``mask`` ``[..., T]``. Returns
    ``(log_likelihood [...], length [...], counted [..., T])``: ``log_likelihood`` is
    ``sum_t log softmax(z_t)[y_t]`` over the counted positions (float32, float64 kept; it carries
    the gradient), ``length`` the number of counted positions (float, same dtype), ``counted`` the
    bool mask of counted positions. Only counted rows of the logits are read.
    """
    leading_shape = student_logits.shape[:-1]
    device = student_logits.device
    counted = _counted_positions(labels, mask, leading_shape, ignore_index, device)
    rows = as_float32(student_logits[counted])
    targets = labels.to(device)[counted].long()
    vocabulary = student_logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocabulary):
        raise ValueError(
            f"labels must lie in [0, {vocabulary}) (the logits' last dim) or equal ignore_index ({ignore_index}); "
            f"got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    token_log_probs = F.log_softmax(rows, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sequence_shape = leading_shape[:-1]
    sequences = 1
    for size in sequence_shape:
        sequences *= int(size)
    owner = torch.arange(sequences, device=device).view(*sequence_shape, 1).expand(leading_shape)[counted]
    log_likelihood = rows.new_zeros(sequences).index_add(0, owner, token_log_probs)
    length = counted.reshape(sequences, -1).sum(-1).to(rows.dtype)
    return log_likelihood.view(sequence_shape), length.view(sequence_shape), counted


def pair_log_likelihoods(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked pairs ``[..., 2, T, V]`` -> ``(log_likelihood [..., 2], length [..., 2], counted pairs [...])``.

    ``counted pairs`` is True where at least one trace of the pair has a counted position.
    """
    _check_pairs(student_logits)
    log_likelihood, length, _ = sequence_log_likelihoods(
        student_logits, labels, mask=mask, ignore_index=ignore_index
    )
    return log_likelihood, length, (length > 0).any(dim=-1)


def length_normalised(log_likelihood: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``log pi(y|x) / |y|``, 0 for a sequence without counted positions (the released code clamps ``|y|`` at 1)."""
    return log_likelihood / length.clamp_min(1.0)


def count_pairs(labels: torch.Tensor, mask: torch.Tensor | None = None, *, ignore_index: int = -100) -> int:
    """Number of pairs of ``labels`` ``[..., 2, T]`` that count (a target in at least one trace).

    The denominator of ``"batchmean"`` for the sequence-unit losses; the engine sums it over a
    step's micro-batches (and processes) to normalise their ``"sum"`` values.
    """
    if labels.dim() < 2 or labels.shape[-2] != 2:
        raise ValueError(f"pair labels must have shape [..., 2, T], got {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but labels have shape {tuple(labels.shape)}")
        counted = counted & mask.to(device=counted.device, dtype=torch.bool)
    return int(counted.any(dim=-1).any(dim=-1).sum())


def reduce_sequences(per_sequence: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-pair values ``[...]`` over the counted pairs (``counted`` bool ``[...]``).

    ``"sum"``: their sum; ``"batchmean"`` / ``"mean"``: their mean (0 when no pair counts);
    ``"none"``: ``per_sequence`` with 0 where a pair does not count. Pairs that do not count are
    selected away before summing, so they reach neither the value nor the gradient.
    """
    if reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEQUENCE_REDUCTIONS}, got '{reduction}'")
    if reduction == "none":
        return torch.where(counted, per_sequence, torch.zeros_like(per_sequence))
    total = per_sequence[counted].sum()
    if reduction == "sum":
        return total
    return total / max(int(counted.sum()), 1)


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


@sequence_unit
@LOSSES.register(
    "redi",
    summary="REDI: -log pi(y+)/|y+| + alpha * log pi(y-)/|y-| on positive/negative teacher traces (Xu et al. 2025).",
)
def redi(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.8,
    positive_weight: float = 1.0,
    negative_gamma: float | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The REDI objective (Xu et al., 2025, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data").

    Stage 2 of REDI, run after SFT on the positive traces: a reference-free objective over
    (prompt ``x``, positive trace ``y+``, negative trace ``y-``) pairs. Per pair::

        L = -positive_weight * log pi(y+|x) / |y+|  +  alpha * log pi(y-|x) / |y-|

    with ``|y|`` the number of counted tokens of a trace (a trace without any counts 0). Minimising
    raises the length-normalised likelihood of the correct trace and lowers that of the incorrect
    one; the asymmetric ``alpha < positive_weight`` keeps the push on the negatives weaker than the
    pull on the positives, which the paper finds necessary for stability without a KL term or a
    reference model. ``alpha = 0`` is SFT on the positives (length-normalised per trace).

    Parameters and the sources of their defaults:

    * ``alpha`` (0.8): weight of the negative term; the paper's recommended value and the released
      recipe's ``reinforce_rejected_coef: 0.8``.
    * ``positive_weight`` (1.0): weight of the positive term, ``reinforce_chosen_coef: 1.0``.
    * ``negative_gamma`` (None: off): the released code's optional negative weighting
      (``use_neg_weighting``, off in the recipe): the negative term is multiplied by
      ``exp(negative_gamma * log pi(y-|x)/|y-|)``, which fades negatives the student already finds
      unlikely. As in that code, the weight is not detached (it is part of the differentiated loss).

    Normalisation follows the released code (``loss_type="reinforce"``): per-trace division by
    the trace length, no clipping, and the mean over pairs. The value is not bounded below (the
    negative term goes to ``-inf`` as ``pi(y-|x) -> 0``), so report it with that in mind.

    Inputs: ``student_logits`` ``[..., 2, T, V]`` (source ``student.logits``), ``labels``
    ``[..., 2, T]`` (``batch.labels``; index 0 positive, 1 negative, as ``preference_jsonl`` data
    with the correct trace as chosen). ``unit = "sequence"``: see the module docstring for the
    reductions (``"none"`` gives one value per pair).
    """
    _check_non_negative(alpha=alpha, positive_weight=positive_weight)
    if negative_gamma is not None:
        _check_non_negative(negative_gamma=negative_gamma)
    log_likelihood, length, counted_pairs = pair_log_likelihoods(
        student_logits, labels, mask=mask, ignore_index=ignore_index
    )
    normalised = length_normalised(log_likelihood, length)
    positive, negative = normalised[..., POSITIVE], normalised[..., NEGATIVE]
    negative_term = alpha * negative
    if negative_gamma is not None and negative_gamma != 0.0:
        negative_term = negative_term * torch.exp(negative_gamma * negative)
    per_pair = -positive_weight * positive + negative_term
    return reduce_sequences(per_pair, counted_pairs, reduction)
