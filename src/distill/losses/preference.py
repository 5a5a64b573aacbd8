"""Distillation losses on preference pairs: DCKD and ADPA.

Reference: S. Gao, F. Wan, J. Guo, X. Quan, Q. Wang, "Advantage-Guided Distillation for Preference
Alignment in Small Language Models", ICLR 2025 (arXiv 2502.17927), section 3 (DCKD and ADPA), and
the authors' released training code (``scripts/run_distill_dpo.py``: ``get_kl_loss`` for DCKD,
``get_reverse_ce`` for ADPA; ``utils/merge_logits_adpa_dataset.py`` for the advantage; the recipes
``student_dckd.yaml`` and ``student_adpa.yaml`` for the weights).

Data layout. A batch of ``B`` preference pairs holds both responses of a pair along a dimension of
size 2, just before the token dimension:

* ``student_logits``, ``teacher_logits``, ``reference_logits``: ``[..., 2, T, V]``, usually
  ``[B, 2, T, V]``. Index 0 along the pair dimension is the chosen (preferred) response ``y_w``,
  index 1 the rejected (dispreferred) response ``y_l``. ``teacher_logits`` come from the aligned
  (DPO-trained) teacher ``pi_dpo``; ``reference_logits`` from that teacher's reference model
  ``pi_ref`` (the teacher before alignment, its DPO reference).
* ``labels``: ``[..., 2, T]`` shifted next-token targets: ``labels[..., t]`` is the token that
  position ``t`` predicts, ``ignore_index`` (-100) where position ``t`` is no target (prompt,
  padding).
* ``mask``: optional bool ``[..., 2, T]``, ``True`` = valid.

A position counts when ``mask`` is True there *and* its label is not ``ignore_index``. Both
responses' valid positions are pooled: ``"batchmean"`` divides by the number of valid positions of
chosen and rejected responses together, ``"sum"`` sums over them, ``"none"`` returns
``[..., 2, T]`` with 0 at positions that do not count. Everything else follows
:mod:`distill.losses._common`: valid positions are selected before any arithmetic, float32
(float64 kept), teacher and reference detached, a fully masked input gives 0 and a zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_temperature,
    kl_rows,
    reduce_rows,
    valid_mask,
)
from distill.registry import LOSSES

CHOSEN, REJECTED = 0, 1
DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


def _check_pairs(
    student_logits: torch.Tensor, *others: tuple[str, torch.Tensor]
) -> None:
    """Logits ``[..., 2, T, V]``, every other logits tensor of the same shape."""
    if student_logits.dim() < 3 or student_logits.shape[-3] != 2:
        raise ValueError(
            "preference losses need logits of shape [..., 2, T, V] (index 0 = chosen, 1 = rejected), "
            f"got {tuple(student_logits.shape)}"
        )
    for name, tensor in others:
        if tensor.shape != student_logits.shape:
            raise ValueError(
                f"{name} {tuple(tensor.shape)} must have the shape of student_logits {tuple(student_logits.shape)}"
            )


def _check_weights(**weights: float) -> None:
    for name, value in weights.items():
        if not value >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _counted_positions(
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    leading_shape: torch.Size,
    ignore_index: int,
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[..., 2, T]``: the positions that count (``mask`` and a label that is a target)."""
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the logits' leading dims are {tuple(leading_shape)}"
        )
    counted = labels.to(device) != ignore_index
    checked = valid_mask(mask, leading_shape, device)
    return counted if checked is None else counted & checked


def _side_of_rows(counted: torch.Tensor) -> torch.Tensor:
    """For each counted position (in :func:`torch.Tensor.__getitem__` order), 0 = chosen, 1 = rejected."""
    side = torch.arange(2, device=counted.device).view(2, 1).expand(counted.shape[-2:])
    return side.expand(counted.shape)[counted]


def _per_side(
    side_rows: torch.Tensor, chosen: float, rejected: float, like: torch.Tensor
) -> torch.Tensor:
    return torch.tensor([chosen, rejected], dtype=like.dtype, device=like.device)[
        side_rows
    ]


def _chosen_nll(
    student_rows: torch.Tensor, label_rows: torch.Tensor, side_rows: torch.Tensor
) -> torch.Tensor:
    """``-log pi_theta(y_t | s_t)`` on chosen rows, 0 on rejected rows (the SFT term on ``y_w``)."""
    log_probs = F.log_softmax(student_rows, dim=-1)
    targets = torch.where(
        side_rows == CHOSEN,
        label_rows.long(),
        torch.zeros_like(label_rows, dtype=torch.long),
    )
    nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(side_rows == CHOSEN, nll, torch.zeros_like(nll))


@LOSSES.register(
    "dckd",
    summary="DCKD: KL(teacher || student) on the chosen and on the rejected response of each pair (Gao et al., ICLR 2025).",
)
def dckd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chosen_weight: float = 1.0,
    rejected_weight: float = 1.0,
    direction: str = "forward",
    temperature: float = 1.0,
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Dual-Constrained Knowledge Distillation (Gao et al., ICLR 2025, section 3.2).

    The aligned teacher ``pi_dpo`` constrains the student ``pi_theta`` token by token on *both*
    responses of a preference pair: on the preferred one, so that the student learns what to
    generate, and on the dispreferred one, so that it also learns where the teacher puts little
    mass. Per counted position ``t`` of response ``y`` (state ``s_t = (x, y_<t)``)::

        chosen   (index 0): chosen_weight   * KL(pi_dpo(.|s_t) || pi_theta(.|s_t))  [+ sft_weight * -log pi_theta(y_t|s_t)]
        rejected (index 1): rejected_weight * KL(pi_dpo(.|s_t) || pi_theta(.|s_t))

    with both distributions at temperature ``T`` (``softmax(z / T)``; the NLL is at ``T = 1``), no
    ``T^2`` factor. ``reduction`` pools the positions of both responses (module docstring).

    Parameters and the choices behind their defaults:

    * ``direction``: ``"forward"`` (default) is ``KL(teacher || student)``, the direction of the
      paper and of the released code (``get_kl_loss``: ``F.kl_div(log q, p)``); ``"reverse"`` is
      ``KL(student || teacher)``.
    * ``chosen_weight`` / ``rejected_weight``: the weights of the two constraints. The paper writes
      them as one objective with both KL terms; the released DCKD recipe sets 0.1 each.
    * ``sft_weight``: the paper's DCKD objective also keeps the supervised loss on the preferred
      response (the recipe: ``sft_on_chosen: 1``). It is off by default so that this term is the
      pure dual constraint (0 exactly when the student equals the teacher) and so that it can sit
      next to :func:`adpa` in one objective without counting the SFT loss twice. ``sft_weight=1,
      chosen_weight=rejected_weight=0.1`` is the released recipe. The paper's DCKD has no DPO
      term (``dpo_weight: 0`` in that recipe), so none is offered here.
    * ``temperature``: not used by the paper (``T = 1``); kept for symmetry with the other KL losses.

    Normalization differs from the released code in one respect: that code averages each KL over
    its own response's tokens and adds the two means, while here ``"batchmean"`` is one mean over
    the counted tokens of both responses (the shared contract, which makes ``"sum"`` usable for
    token-count normalization over a whole optimizer step). The code also keeps only the teacher's
    top-k probabilities (a storage compression); this function uses the full distributions.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got '{direction}'")
    _check_weights(
        chosen_weight=chosen_weight,
        rejected_weight=rejected_weight,
        sft_weight=sft_weight,
    )
    check_temperature(temperature)
    _check_pairs(student_logits, ("teacher_logits", teacher_logits))
    leading_shape = student_logits.shape[:-1]
    counted = _counted_positions(
        labels, mask, leading_shape, ignore_index, student_logits.device
    )
    student_rows = as_float32(student_logits[counted])
    teacher_rows = as_float32(teacher_logits.detach()[counted]).to(student_rows.dtype)
    side_rows = _side_of_rows(counted)
    log_q = F.log_softmax(student_rows / temperature, dim=-1)
    log_p = F.log_softmax(teacher_rows / temperature, dim=-1)
    kl = kl_rows(log_p, log_q) if direction == "forward" else kl_rows(log_q, log_p)
    per_row = _per_side(side_rows, chosen_weight, rejected_weight, kl) * kl
    if sft_weight != 0.0:
        label_rows = labels.to(student_logits.device)[counted]
        per_row = per_row + sft_weight * _chosen_nll(
            student_rows, label_rows, side_rows
        )
    return reduce_rows(per_row, counted, leading_shape, reduction)


@LOSSES.register(
    "adpa",
    summary="ADPA: maximize the student's expected teacher advantage log pi_dpo - log pi_ref over the vocabulary (Gao et al., ICLR 2025).",
)
def adpa(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chosen_weight: float = 0.0,
    rejected_weight: float = 1.0,
    beta: float = 1.0,
    sft_weight: float = 0.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Advantage-Guided Distillation for Preference Alignment (Gao et al., ICLR 2025, section 3.3).

    A DPO-trained teacher ``pi_dpo`` and its reference ``pi_ref`` define a token-level advantage
    (the DPO implicit reward of Rafailov et al. 2024, "From r to Q*"), for every token ``a`` of the
    vocabulary at state ``s_t = (x, y_<t)``::

        A(s_t, a) = beta * (log pi_dpo(a | s_t) - log pi_ref(a | s_t))

    ADPA gives this whole vector to the student as a distribution-level reward and maximizes the
    student's expected advantage. Per counted position the loss is::

        w * -sum_a pi_theta(a | s_t) * A(s_t, a)        w = chosen_weight or rejected_weight

    plus, on chosen positions, ``sft_weight * -log pi_theta(y_t | s_t)``. ``pi_theta`` is the
    student at temperature 1; ``pi_dpo``, ``pi_ref`` come from ``teacher_logits`` and
    ``reference_logits`` (both detached). The gradient with respect to the student's logits is
    ``-w pi_theta(a) (A(a) - E_{pi_theta}[A])``: gradient descent raises the probability of every
    token whose advantage is above the student's current average and lowers the others. The
    value is not a divergence: it can be negative, and its minimum (all mass on the best-advantage
    token) is not the teacher; it is meant to be combined with the SFT loss (the paper's objective)
    and, in ADPA+, with DCKD (see ``docs/preference.md``).

    Parameters and the choices behind their defaults:

    * ``chosen_weight=0`` / ``rejected_weight=1``: the paper applies the advantage term to
      responses sampled from the student itself (the released pipeline regenerates the rejected
      side of each pair with the student, and the code, ``get_reverse_ce``, applies it to that side
      only) while the SFT loss uses the ground-truth preferred response. Put the student's
      samples at index 1. ``chosen_weight > 0`` also applies the advantage on the chosen responses.
    * ``beta``: the scale of the advantage. The released code uses the raw log-ratio (``beta = 1``)
      and sets the scale through the term weight (``adpa_weight: 1.6`` in its recipe); the default
      does the same.
    * ``sft_weight``: the paper's ADPA objective adds the SFT loss on the preferred response
      (``sft_on_chosen: 1`` in the recipe). Off by default so that the SFT loss is counted once when
      this term is combined with :func:`dckd`; set it to 1 on one of the two terms.

    Departures from the released code, which stores only the top-k tokens of the teacher's
    distribution (the advantage is taken on those tokens, the remaining mass gets advantage 0):
    this function uses the full vocabulary. The
    code's optional sequence-level importance weight (``adpa_importance_sampling``, off in the
    recipe) needs the student's own reference model and is not part of this term.
    """
    _check_weights(
        chosen_weight=chosen_weight,
        rejected_weight=rejected_weight,
        sft_weight=sft_weight,
    )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_pairs(
        student_logits,
        ("teacher_logits", teacher_logits),
        ("reference_logits", reference_logits),
    )
    leading_shape = student_logits.shape[:-1]
    counted = _counted_positions(
        labels, mask, leading_shape, ignore_index, student_logits.device
    )
    student_rows = as_float32(student_logits[counted])
    teacher_rows = as_float32(teacher_logits.detach()[counted]).to(student_rows.dtype)
    reference_rows = as_float32(reference_logits.detach()[counted]).to(
        student_rows.dtype
    )
    side_rows = _side_of_rows(counted)
    advantage = beta * (
        F.log_softmax(teacher_rows, dim=-1) - F.log_softmax(reference_rows, dim=-1)
    )
    student_probs = F.softmax(student_rows, dim=-1)
    expected_advantage = (student_probs * advantage).sum(dim=-1)
    per_row = (
        -_per_side(side_rows, chosen_weight, rejected_weight, expected_advantage)
        * expected_advantage
    )
    if sft_weight != 0.0:
        label_rows = labels.to(student_logits.device)[counted]
        per_row = per_row + sft_weight * _chosen_nll(
            student_rows, label_rows, side_rows
        )
    return reduce_rows(per_row, counted, leading_shape, reduction)
