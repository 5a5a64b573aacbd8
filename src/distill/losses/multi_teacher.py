"""Distillation from several teachers: ensemble targets, confidence weighting, MST-Distill.

References:

* G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015, section 2
  (soft targets) and its remark that an ensemble's averaged predictions can be distilled into one
  model.
* S. You, C. Xu, C. Xu, D. Tao, "Learning from Multiple Teacher Networks", KDD 2017: the student
  matches the averaged soft targets of several teachers.
* H. Zhang, D. Chen, C. Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation" (CA-MKD),
  ICASSP 2022 (arXiv 2201.00007): sample-wise teacher weights from each teacher's cross-entropy
  with the label, so teachers close to the one-hot label weigh more.
* H. Li, P. Yang, J. Chen, L. Dong, Y. Chen, Q. Wang, "MST-Distill: Mixture of Specialized
  Teachers for Cross-Modal Knowledge Distillation", ACM MM 2025 (arXiv 2507.07015); official code
  github.com/Gray-OREO/MST-Distill, ``KD_methods/MST.py`` and ``main-MST-Distill.py``.

Inputs. ``teachers_logits`` ``[..., K, C]`` holds the K teachers' logits (each already divided by
that teacher's own temperature; source ``teachers.logits``), ``teachers_weights`` ``[..., K]`` (or
``[K]``) their fixed non-negative weights (source ``teachers.weights``; normalised here, uniform
when absent). The shared contract of :mod:`distill.losses._common` holds: ``mask`` over the
leading dims, ``reduction``, float32 (float64 kept), teachers detached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from distill.losses._common import (
    REDUCTIONS,
    as_float32,
    check_logits,
    check_temperature,
    kl_rows,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES

METHODS: tuple[str, ...] = ("mean", "confidence")
CONFIDENCES: tuple[str, ...] = ("label", "entropy", "camkd")
ROUTER_INPUTS: tuple[str, ...] = ("student_logits", "student_features", "teachers_logits")
BALANCE_MODES: tuple[str, ...] = ("kl", "cv", "none")
ROUTER_OBJECTIVES: tuple[str, ...] = ("dense", "routed")


# ------------------------------------------------------------------------------------ checks


def _check_teachers(teachers_logits: torch.Tensor) -> tuple[int, int]:
    """(K, C) of ``teachers_logits`` ``[..., K, C]``."""
    if teachers_logits.dim() < 2:
        raise ValueError(
            f"teachers_logits must have shape [..., K, C] (K teachers, C classes), got {tuple(teachers_logits.shape)}"
        )
    num_teachers, classes = int(teachers_logits.shape[-2]), int(teachers_logits.shape[-1])
    if num_teachers < 1:
        raise ValueError("teachers_logits holds no teacher (K = 0)")
    return num_teachers, classes


def _expand_weights(
    weights: torch.Tensor | None, leading_shape: torch.Size, num_teachers: int, device: torch.device
) -> torch.Tensor | None:
    """``weights`` as ``[..., K]`` (a ``[K]`` vector is repeated over the leading dims)."""
    if weights is None:
        return None
    weights = weights.to(device)
    if tuple(weights.shape) == (num_teachers,):
        return weights.expand(*leading_shape, num_teachers)
    if tuple(weights.shape) != (*leading_shape, num_teachers):
        raise ValueError(
            f"teachers' weights have shape {tuple(weights.shape)}; expected [{num_teachers}] or "
            f"{(*tuple(leading_shape), num_teachers)} (the logits' leading dims, then K)"
        )
    return weights


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got '{value}'")


# ------------------------------------------------------------------------- ensemble weights


def _log_fixed_weights(weight_rows: torch.Tensor | None, rows: int, num_teachers: int, like: torch.Tensor) -> torch.Tensor:
    """``log(w / sum w)`` per row ``[P, K]``; ``-inf`` where a weight is 0 (no ``log(0)`` is taken)."""
    if weight_rows is None:
        return like.new_full((rows, num_teachers), -math.log(num_teachers))
    weight_rows = weight_rows.detach().to(like.dtype)
    if not torch.isfinite(weight_rows).all() or (weight_rows < 0).any():
        raise ValueError("teachers' weights must be finite and >= 0")
    total = weight_rows.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("teachers' weights must have a positive sum for every position")
    positive = weight_rows > 0
    safe = torch.where(positive, weight_rows, torch.ones_like(weight_rows))
    return torch.where(positive, safe.log() - total.log(), torch.full_like(weight_rows, -math.inf))


def _confidence_scores(
    teacher_log_probs: torch.Tensor,
    label_rows: torch.Tensor | None,
    confidence: str,
    confidence_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Log of the (unnormalised) per-sample confidence weights ``[P, K]`` from log-probs ``[P, K, C]``."""
    rows, num_teachers, classes = teacher_log_probs.shape
    if confidence == "entropy":
        entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(dim=-1)
        return -entropy / confidence_temperature
    if label_rows is None:
        raise ValueError(
            f"confidence='{confidence}' needs the labels: pass them (in YAML: inputs.labels: batch.labels)"
        )
    label_rows = label_rows.to(teacher_log_probs.device).long()
    ignored = label_rows == ignore_index
    if ((label_rows < 0) & ~ignored).any() or (label_rows >= classes).any():
        raise ValueError(f"labels must be in [0, {classes}) or ignore_index ({ignore_index})")
    index = torch.where(ignored, torch.zeros_like(label_rows), label_rows)
    cross_entropy = -teacher_log_probs.gather(-1, index.view(rows, 1, 1).expand(rows, num_teachers, 1)).squeeze(-1)
    if confidence == "label":
        scores = -cross_entropy / confidence_temperature
    else:  # camkd: (1 - softmax_k(CE_k)) / (K - 1), the official CA-MKD rule
        if num_teachers == 1:
            scores = torch.zeros_like(cross_entropy)
        else:
            share = 1.0 - F.softmax(cross_entropy / confidence_temperature, dim=-1)
            scores = torch.log(share.clamp_min(torch.finfo(share.dtype).tiny)) - math.log(num_teachers - 1)
    # A position without a label (ignore_index) keeps the fixed weights alone.
    return torch.where(ignored.unsqueeze(-1), torch.zeros_like(scores), scores)


def _ensemble_log_weights(
    teacher_rows: torch.Tensor,
    weight_rows: torch.Tensor | None,
    label_rows: torch.Tensor | None,
    *,
    method: str,
    confidence: str,
    confidence_temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """``log a`` ``[P, K]`` of the per-sample mixture weights, from teacher logits rows ``[P, K, C]`` (float)."""
    rows, num_teachers, _ = teacher_rows.shape
    log_fixed = _log_fixed_weights(weight_rows, rows, num_teachers, teacher_rows)
    if method == "mean":
        return log_fixed
    scores = _confidence_scores(
        F.log_softmax(teacher_rows, dim=-1), label_rows, confidence, confidence_temperature, ignore_index
    )
    # softmax over k of (score + log w): the confidence weights times the fixed ones, renormalised
    return F.log_softmax(scores + log_fixed, dim=-1)


def _mixture_log_probs(teacher_rows: torch.Tensor, log_weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log sum_k a_k softmax(z_k / T)`` ``[P, C]`` by logsumexp (no ``log(0)``)."""
    teacher_log_probs = F.log_softmax(teacher_rows / temperature, dim=-1)
    if teacher_rows.shape[-2] == 1:
        return teacher_log_probs[..., 0, :]  # one teacher: exactly its distribution
    return torch.logsumexp(log_weights.unsqueeze(-1) + teacher_log_probs, dim=-2)


def _check_ensemble_options(method: str, confidence: str, confidence_temperature: float) -> None:
    _check_choice("method", method, METHODS)
    _check_choice("confidence", confidence, CONFIDENCES)
    if not confidence_temperature > 0:
        raise ValueError(f"confidence_temperature must be > 0, got {confidence_temperature}")


def combine_teachers(
    teachers_logits: torch.Tensor,
    weights: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    method: str = "mean",
    confidence: str = "label",
    confidence_temperature: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Log-probabilities ``[..., C]`` of the teachers' per-sample mixture ``sum_k a_k softmax(z_k / T)``.

    ``teachers_logits`` ``[..., K, C]``; ``weights`` ``[..., K]`` or ``[K]`` (fixed, >= 0,
    normalised here; uniform when None); ``labels`` ``[...]`` (for ``confidence="label"`` or
    ``"camkd"``). The mixture weights ``a`` are:

    * ``method="mean"``: the fixed weights ``w`` -- the averaged soft targets of an ensemble
      (Hinton et al. 2015; You et al., KDD 2017).
    * ``method="confidence"``: per-sample weights from each teacher's confidence, multiplied by
      ``w`` and renormalised, ``a_k ∝ w_k c_k``:

      - ``confidence="label"``: ``c = softmax_k(-CE(z_k, y) / tau)``, large for teachers close to
        the one-hot label, the idea of CA-MKD (Zhang et al., ICASSP 2022);
      - ``confidence="entropy"``: ``c = softmax_k(-H(softmax(z_k)) / tau)`` (label-free: confident
        teachers weigh more);
      - ``confidence="camkd"``: CA-MKD's own rule, ``c_k = (1 - softmax_k(CE_k / tau)) / (K - 1)``
        (official code ``distiller_zoo/CAMKD.py``, ``tau = 1``), which is flatter than ``"label"``.

      ``tau`` is ``confidence_temperature``. Confidences are computed from the logits as given
      (temperature 1); a position whose label is ``ignore_index`` keeps ``w``.

    ``temperature`` (default 1) softens each teacher before mixing. The result is computed in
    float32 (float64 kept) with logsumexp, without gradient (the teachers are fixed). With one
    teacher it is exactly ``log_softmax(z / T)``.
    """
    num_teachers, _ = _check_teachers(teachers_logits)
    _check_ensemble_options(method, confidence, confidence_temperature)
    check_temperature(temperature)
    leading_shape = teachers_logits.shape[:-2]
    with torch.no_grad():
        teacher_rows = as_float32(teachers_logits.detach()).reshape(-1, *teachers_logits.shape[-2:])
        expanded = _expand_weights(weights, leading_shape, num_teachers, teachers_logits.device)
        weight_rows = None if expanded is None else expanded.reshape(-1, num_teachers)
        if labels is not None and tuple(labels.shape) != tuple(leading_shape):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(leading_shape)}")
        label_rows = None if labels is None else labels.reshape(-1)
        log_weights = _ensemble_log_weights(
            teacher_rows,
            weight_rows,
            label_rows,
            method=method,
            confidence=confidence,
            confidence_temperature=confidence_temperature,
            ignore_index=ignore_index,
        )
        mixture = _mixture_log_probs(teacher_rows, log_weights, temperature)
    return mixture.reshape(*leading_shape, mixture.shape[-1])


@LOSSES.register(
    "multi_teacher_kd",
    summary="Multi-teacher KD: T^2 KL(weighted mixture of the teachers' soft targets || student) (Hinton 2015; You et al. 2017).",
)
def multi_teacher_kd(
    student_logits: torch.Tensor,
    teachers_logits: torch.Tensor,
    teachers_weights: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 4.0,
    method: str = "mean",
    confidence: str = "label",
    confidence_temperature: float = 1.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Averaged-soft-target multi-teacher KD: ``T^2 KL(p_ens^T || softmax(z_s / T))`` per position.

    ``p_ens^T = sum_k a_k softmax(z_k / T)`` is the mixture of :func:`combine_teachers` (the
    teachers softened at ``T`` and mixed with the per-sample weights ``a``: fixed weights for
    ``method="mean"`` as in Hinton et al. (2015) and You et al. (KDD 2017); confidence weights
    from CA-MKD (Zhang et al., ICASSP 2022) for ``method="confidence"``). The ``T^2`` factor is
    Hinton's. With one teacher this is exactly :func:`distill.losses.kd.hinton_kd`.

    ``student_logits`` ``[..., C]``, ``teachers_logits`` ``[..., K, C]`` (source
    ``teachers.logits``), ``teachers_weights`` ``[..., K]`` or ``[K]`` (source
    ``teachers.weights``, read by default so the configured weights apply; ``None`` for uniform
    weights), ``labels`` ``[...]`` (optional; needed by the label-based confidences, in YAML
    ``inputs.labels: batch.labels``). The teachers are detached; float32; ``mask`` and
    ``reduction`` as in :mod:`distill.losses._common`.
    """
    check_logits(student_logits)
    num_teachers, _ = _check_teachers(teachers_logits)
    check_temperature(temperature)
    _check_ensemble_options(method, confidence, confidence_temperature)
    leading_shape = student_logits.shape[:-1]
    if tuple(teachers_logits.shape) != (*leading_shape, num_teachers, student_logits.shape[-1]):
        raise ValueError(
            f"teachers_logits {tuple(teachers_logits.shape)} must be [..., K, C] with the student's leading dims "
            f"{tuple(leading_shape)} and C = {student_logits.shape[-1]}"
        )
    device = student_logits.device
    mask = valid_mask(mask, leading_shape, device)
    weights = _expand_weights(teachers_weights, leading_shape, num_teachers, device)
    if labels is not None and tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(leading_shape)}")
    extra = [t for t in (weights, labels) if t is not None]
    rows = valid_rows(mask, student_logits, teachers_logits.detach(), *[t.to(device) for t in extra], leading_dims=len(leading_shape))
    student_rows, teacher_rows = as_float32(rows[0]), as_float32(rows[1])
    teacher_rows = teacher_rows.to(student_rows.dtype)
    weight_rows = rows[2] if weights is not None else None
    label_rows = rows[-1] if labels is not None else None
    target = combine_teachers(
        teacher_rows,
        weight_rows,
        label_rows,
        method=method,
        confidence=confidence,
        confidence_temperature=confidence_temperature,
        temperature=temperature,
        ignore_index=ignore_index,
    )
    student_log_probs = F.log_softmax(student_rows / temperature, dim=-1)
    per_row = kl_rows(target, student_log_probs) * (temperature**2)
    return reduce_rows(per_row, mask, leading_shape, reduction)


# ------------------------------------------------------------------------------ MST-Distill


def mask_teacher_logits(
    teachers_logits: torch.Tensor,
    weight1: torch.Tensor,
    bias1: torch.Tensor,
    weight2: torch.Tensor,
    bias2: torch.Tensor,
) -> torch.Tensor:
    """MST-Distill's masking module moved to the teachers' outputs: ``m_k(z_k) * z_k`` per teacher.

    ``teachers_logits`` ``[P, K, C]``; per teacher ``k`` a two-layer network
    ``m_k(z) = 2 sigmoid(W2_k relu(W1_k z + b1_k) + b2_k)`` with ``weight1`` ``[K, C, H]``,
    ``bias1`` ``[K, H]``, ``weight2`` ``[K, H, C]``, ``bias2`` ``[K, C]``. The soft mask lies in
    ``(0, 2)`` and is exactly 1 when the output layer is zero (the initialisation): an untrained
    mask leaves its teacher unchanged. Returns the masked logits ``[P, K, C]``.
    """
    hidden = torch.relu(torch.einsum("pkc,kch->pkh", teachers_logits, weight1) + bias1)
    gate = torch.einsum("pkh,khc->pkc", hidden, weight2) + bias2
    return 2.0 * torch.sigmoid(gate) * teachers_logits


def mask_reconstruction_rows(
    student_logits: torch.Tensor, masked_teachers_logits: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """The masking module's own objective per row ``[P]``: ``sum_k T^2 KL(sg(q^T) || softmax(m_k z_k / T))``.

    MST-Distill (Li et al., ACM MM 2025), as in the official ``main-MST-Distill.py`` stage 2 (``distillation_loss_detached(outputs_t,
    outputs_s)``): each masked teacher is moved towards the student's detached distribution ``q``,
    which suppresses what the student cannot absorb. Summed over teachers, so each mask gets
    exactly its own teacher's gradient (the official code steps one optimizer per mask).
    """
    student_log_probs = F.log_softmax(student_logits.detach() / temperature, dim=-1).unsqueeze(-2)
    teacher_log_probs = F.log_softmax(masked_teachers_logits / temperature, dim=-1)
    return kl_rows(student_log_probs.expand_as(teacher_log_probs), teacher_log_probs).sum(dim=-1) * (temperature**2)


def load_balancing_loss(probs: torch.Tensor, *, mode: str = "kl", log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """MST-Distill's load-balancing loss of the router's probabilities ``[P, K]`` (a scalar).

    Official ``load_balancing_loss``: ``mode="kl"`` is ``KL(u || mean_p g_p) / K`` (``u``
    uniform; the ``/ K`` is the official ``KLDivLoss(reduction="batchmean")`` applied to a
    ``[K]`` vector), computed here from ``log_probs`` by logsumexp so it stays finite when a
    teacher's mean probability underflows; ``mode="cv"`` is the coefficient of variation
    ``std_k(I) / mean_k(I)`` of the importances ``I_k = sum_p g_pk`` (unbiased std, as
    ``torch.std``). 0 when there are no rows or one teacher.
    """
    _check_choice("mode", mode, BALANCE_MODES)
    rows, num_teachers = probs.shape
    if mode == "none" or rows == 0 or num_teachers == 1:
        return probs.sum() * 0.0
    if mode == "kl":
        if log_probs is None:
            log_probs = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
        log_mean = torch.logsumexp(log_probs, dim=0) - math.log(rows)
        # sum_k u_k (log u_k - log mean_k) / K, u_k = 1 / K
        return (-math.log(num_teachers) - log_mean).mean() / num_teachers
    importance = probs.sum(dim=0)
    return importance.std() / importance.mean()


class _Router(torch.nn.Sequential):
    """MST-Distill's instance-level routing network (Li et al. 2025): ``Linear(D, H) -> ReLU -> Linear(H, K)``.

    ``H = 0``: one Linear. The official ``GateNet`` is ``Linear(C, 2C) -> Linear(2C, K)`` without activation.
    """

    def __init__(self, in_features: int, hidden: int, num_teachers: int) -> None:
        if hidden > 0:
            super().__init__(
                torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_teachers)
            )
        else:
            super().__init__(torch.nn.Linear(in_features, num_teachers))


def route_weights(probs: torch.Tensor, top_k: int, *, straight_through: bool = True) -> torch.Tensor:
    """Top-k routing weights ``[P, K]`` from the router's probabilities ``g`` ``[P, K]`` (MST-Distill, Li et al. 2025).

    Forward value: ``g`` kept on the ``top_k`` largest entries and renormalised to sum to 1, the
    other ``K - top_k`` entries exactly 0. Backward (``straight_through=True``, when ``top_k <
    K``): the gradient reaches ``g`` as if the weights were ``g`` itself (``sparse + (g -
    sg(g))``), so every teacher's score learns, also with ``top_k = 1``, whose renormalised weight
    is the constant 1. ``straight_through=False`` differentiates the renormalised weights.
    """
    num_teachers = probs.shape[-1]
    if top_k >= num_teachers:
        return probs
    index = probs.topk(top_k, dim=-1).indices
    keep = torch.zeros_like(probs).scatter(-1, index, 1.0)
    kept = probs * keep
    sparse = kept / kept.sum(dim=-1, keepdim=True)
    if straight_through:
        return sparse.detach() + (probs - probs.detach())
    return sparse


@LOSSES.register(
    "mst_distill",
    summary="MST-Distill: student KD to an instance-routed top-k mixture of (masked) teachers (Li et al., ACM MM 2025).",
)
class MSTDistill(torch.nn.Module):
    """MST-Distill (Li et al., ACM MM 2025, arXiv 2507.07015): a mixture of specialized teachers.

    Per valid position, with ``K`` teachers' logits ``z_k`` (``teachers_logits`` ``[..., K, C]``)
    and the student's ``z_s`` (``student_logits`` ``[..., C]``)::

        z~_k   = m_k(z_k) * z_k                       masking module (learned, see below)
        g      = softmax(router(x))                   instance-level routing network, [K]
        a      = top_k(g), renormalised               exactly K - top_k zeros
        p_mix  = sum_k a_k softmax(z~_k / T)          the routed target
        value  = T^2 KL(p_mix || softmax(z_s / T)) + balance_weight * LB(g over the batch)

    The student's gradient is that of the KD term with ``p_mix`` fixed. The returned value also
    carries, without changing it, the gradients of the router and of the masks described below.
    The task loss (cross-entropy with the labels, official ``w_task``) is a separate term.

    **Router** (official ``GateNet``). Reads ``router_input``: ``"student_logits"`` (default, as
    the official code, which feeds the student's outputs to ``GateNet(cls_num, ways)``),
    ``"student_features"`` (the input of the student's last Linear, ``student.features``; name it
    in the term's ``inputs``), or ``"teachers_logits"`` (the ``K * C`` masked teacher logits,
    flattened).
    The input is detached by default (``detach_router_input``; the official code does not detach
    it, so its load-balancing loss also moves the student). Network: ``Linear(D, H) -> ReLU ->
    Linear(H, K)`` with ``H = router_hidden`` (default ``2 D``, the official width; the official
    GateNet has no activation between its two Linears, ``router_hidden=0`` gives one Linear).

    **How the router learns** (the deviation that matters). In the official code the top-k KD
    loss uses only the *indices* of the top-k teachers (``k_ways_MTGdistillation_detached``
    averages the selected teachers' KLs with equal weights), so the router's only gradient is the
    load-balancing loss, which asks for even use over the batch but for no per-instance choice.
    Here the router also learns from the KD loss with the student side detached:

    * ``router_objective="dense"`` (default): the router minimises ``T^2 KL(sum_k g_k p~_k ||
      sg(q))``, the KD term with its own dense probabilities ``g`` as mixture weights and the
      student's ``q = softmax(z_s / T)`` fixed. Each instance's ``g`` moves towards the teachers
      whose distributions the student agrees with; with the task loss training the student, these
      are the teachers that are right on that instance, and the top-k selection follows them.
    * ``router_objective="routed"``: the exact partial derivative of the returned KL with respect
      to the routing weights, ``T^2 sum_c p~_k,c (log p_mix,c - log q_c)``, passed through the
      top-k selection by straight-through (:func:`route_weights`). It sees only the selected
      mixture: once the selected teacher is the one the student matches, its gradient vanishes,
      so with ``top_k = 1`` the router stays near indifference and top-1 choices flip (on the toy
      problem of the tests, without masking, it ends at ``g ~ 0.52`` for the right teacher,
      against ``~ 0.9`` with ``"dense"``).

    With ``top_k = K`` the two are the same. Both are attached as ``x - sg(x)``: they change the
    router's gradient, not the value, and not the student's gradient. The student's target uses
    the renormalised top-k weights, where the official code averages the selected teachers' KLs
    with weights ``1 / k``; for ``top_k = 1`` (the official default) both give the same value.

    **Load balancing** (official ``load_balancing_loss``): ``balance="kl"`` (official default,
    ``KL(uniform || mean_p g_p) / K``), ``"cv"`` (coefficient of variation of the importances) or
    ``"none"``; on the dense ``g`` over the valid positions of the call; ``balance_weight`` is the
    official ``w_lb`` (1.0; its decay, x0.9 every 10 epochs, is left to the user). Its value is
    added to every position's value, so ``batchmean`` carries it once.

    **Masking module**, adapted. The paper's MaskNet reads a teacher's *intermediate feature*,
    predicts a sigmoid mask over its dimensions (embedding, multi-head self-attention over the
    dimensions, Linear, sigmoid) and multiplies the feature with it; one mask per (teacher, layer)
    makes the "specialized teachers". It is trained in a stage of its own, with the student fixed,
    to bring the masked teacher's output towards the student's (official stage 2:
    ``T^2 KL(sg(q) || p~_k)``, ``T = 4``), and frozen while the student distills (stage 3). Our
    sources are the teachers' outputs, so here: (1) the mask acts on each teacher's *logits*, one
    mask network per teacher (:func:`mask_teacher_logits`: two Linears with ``mask_hidden`` units
    instead of the attention block, so it stays small for large ``C``; the mask lies in ``(0, 2)``
    and starts at exactly 1); (2) it is trained with the official stage-2 objective
    (:func:`mask_reconstruction_rows`, student detached), at ``temperature``, weighted by
    ``mask_weight``, but *during* distillation rather than in a separate stage: its gradient
    reaches only the mask parameters, and the student's target and the router use the masked
    logits detached from the masks (as the frozen masks of stage 3); (3) because the masks train
    together with a student that starts untrained, the stage-2 objective alone has a degenerate
    fixed point: the masks shrink the teachers' logits towards the (flat) early student, the
    targets go flat, the student stays flat (measured on digits with 0.1 CE + 0.9 MST: 80.0% test
    accuracy, NLL 1.95, against 88.9% for the plain ensemble). So the mask objective also
    *reconstructs* its teacher (the abstract's "reconstruct teacher representations"):
    ``mask_anchor * T^2 KL(p_k || p~_k)`` per teacher keeps each masked teacher near the one it
    masks (``mask_anchor`` 1.0; 0 gives the official stage-2 objective alone). ``masking=False``
    uses the teachers as they are.

    **Teachers.** The paper's K specialized teachers are a multimodal and a cross-modal teacher,
    each with a mask at one of ``mask_layer_num`` layers (``K = 2 * mask_layer_num``). Here they
    are the stage's teachers (source ``teachers.logits``), each with its own output mask.

    Constructor (keyword-only): ``num_classes`` and ``input_shapes`` are supplied by the
    objective (``K`` is read from ``input_shapes["teachers_logits"] = (K, C)``, the router's
    width from the shape of its input); ``temperature`` (4.0, official ``T``), ``top_k`` (1),
    ``router_input`` (``"student_logits"``), ``router_hidden`` (None: ``2 D``),
    ``detach_router_input`` (True), ``router_objective`` (``"dense"``), ``balance`` (``"kl"``),
    ``balance_weight`` (1.0), ``masking`` (True), ``mask_hidden`` (64), ``mask_weight`` (1.0),
    ``mask_anchor`` (1.0).

    After each call ``last_weights`` (``[P, K]``, the routing weights of the valid positions),
    ``last_probs`` (the dense ``g``) and ``last_losses`` (``kd``, ``balance``, ``mask``: detached
    scalars) hold what the call computed, for tests and logs.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shapes: Mapping[str, tuple[int, ...]],
        temperature: float = 4.0,
        top_k: int = 1,
        router_input: str = "student_logits",
        router_hidden: int | None = None,
        detach_router_input: bool = True,
        router_objective: str = "dense",
        balance: str = "kl",
        balance_weight: float = 1.0,
        masking: bool = True,
        mask_hidden: int = 64,
        mask_weight: float = 1.0,
        mask_anchor: float = 1.0,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        _check_choice("router_input", router_input, ROUTER_INPUTS)
        _check_choice("balance", balance, BALANCE_MODES)
        _check_choice("router_objective", router_objective, ROUTER_OBJECTIVES)
        if "teachers_logits" not in input_shapes or len(tuple(input_shapes["teachers_logits"])) != 2:
            raise ValueError("MSTDistill needs input_shapes['teachers_logits'] = (K, C), the shape of one sample")
        num_teachers, classes = (int(n) for n in input_shapes["teachers_logits"])
        if classes != int(num_classes):
            raise ValueError(f"teachers_logits has {classes} classes but num_classes is {num_classes}")
        if num_teachers < 1:
            raise ValueError("MSTDistill needs at least one teacher")
        if not 1 <= int(top_k) <= num_teachers:
            raise ValueError(f"top_k must be in [1, {num_teachers}] (the number of teachers), got {top_k}")
        if balance_weight < 0 or mask_weight < 0 or mask_anchor < 0:
            raise ValueError(
                f"balance_weight, mask_weight and mask_anchor must be >= 0, got {balance_weight}, {mask_weight} and {mask_anchor}"
            )
        if int(mask_hidden) < 1:
            raise ValueError(f"mask_hidden must be >= 1, got {mask_hidden}")
        if router_input == "student_logits":
            in_features = classes
        elif router_input == "teachers_logits":
            in_features = num_teachers * classes
        else:
            shape = tuple(input_shapes.get("student_features", ()))
            if not shape:
                raise ValueError(
                    "router_input='student_features' needs the features' shape: name the source in the term's "
                    "inputs (student_features: student.features)"
                )
            in_features = int(shape[-1])
        hidden = 2 * in_features if router_hidden is None else int(router_hidden)
        if hidden < 0:
            raise ValueError(f"router_hidden must be >= 0, got {router_hidden}")
        self.num_teachers = num_teachers
        self.num_classes = classes
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.router_input = router_input
        self.detach_router_input = bool(detach_router_input)
        self.router_objective = router_objective
        self.balance = balance
        self.balance_weight = float(balance_weight)
        self.masking = bool(masking)
        self.mask_weight = float(mask_weight)
        self.mask_anchor = float(mask_anchor)
        self.router = _Router(in_features, hidden, num_teachers)
        if self.masking:
            width = int(mask_hidden)
            bound = 1.0 / math.sqrt(classes)  # nn.Linear's default range for the first layer
            self.mask_weight1 = torch.nn.Parameter(torch.empty(num_teachers, classes, width).uniform_(-bound, bound))
            self.mask_bias1 = torch.nn.Parameter(torch.empty(num_teachers, width).uniform_(-bound, bound))
            self.mask_weight2 = torch.nn.Parameter(torch.zeros(num_teachers, width, classes))
            self.mask_bias2 = torch.nn.Parameter(torch.zeros(num_teachers, classes))
        self.last_weights: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        self.last_losses: dict[str, torch.Tensor] = {}

    # -- parts ----------------------------------------------------------------------------------

    def masked_teachers(self, teacher_rows: torch.Tensor) -> torch.Tensor:
        """The teachers' logits rows ``[P, K, C]`` through their masks (with gradient to the masks)."""
        if not self.masking:
            return teacher_rows
        dtype = teacher_rows.dtype
        return mask_teacher_logits(
            teacher_rows,
            self.mask_weight1.to(dtype),
            self.mask_bias1.to(dtype),
            self.mask_weight2.to(dtype),
            self.mask_bias2.to(dtype),
        )

    def router_probs(
        self, student_rows: torch.Tensor, teacher_rows: torch.Tensor, feature_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities ``g``, log-probabilities) ``[P, K]`` of the routing network."""
        if self.router_input == "student_logits":
            x = student_rows
        elif self.router_input == "teachers_logits":
            x = teacher_rows.reshape(teacher_rows.shape[0], -1)
        else:
            if feature_rows is None:
                raise ValueError(
                    "router_input='student_features' needs student_features: set inputs.student_features: student.features"
                )
            x = as_float32(feature_rows)
        if self.detach_router_input:
            x = x.detach()
        parameter = next(self.router.parameters())
        logits = self.router(x.to(parameter.dtype)).to(student_rows.dtype)
        return F.softmax(logits, dim=-1), F.log_softmax(logits, dim=-1)

    def route(
        self,
        student_logits: torch.Tensor,
        teachers_logits: torch.Tensor,
        student_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routing weights ``[..., K]`` (top-k, renormalised) for unmasked inputs, without gradient."""
        leading_shape = student_logits.shape[:-1]
        with torch.no_grad():
            student_rows = as_float32(student_logits).reshape(-1, student_logits.shape[-1])
            teacher_rows = as_float32(teachers_logits).reshape(-1, self.num_teachers, self.num_classes).to(student_rows.dtype)
            features = None if student_features is None else student_features.reshape(-1, student_features.shape[-1])
            probs, _ = self.router_probs(student_rows, self.masked_teachers(teacher_rows), features)
            weights = route_weights(probs, self.top_k, straight_through=False)
        return weights.reshape(*leading_shape, self.num_teachers)

    # -- the loss -------------------------------------------------------------------------------

    def forward(
        self,
        student_logits: torch.Tensor,
        teachers_logits: torch.Tensor,
        student_features: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        check_logits(student_logits)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")
        leading_shape = student_logits.shape[:-1]
        expected = (*leading_shape, self.num_teachers, self.num_classes)
        if student_logits.shape[-1] != self.num_classes or tuple(teachers_logits.shape) != expected:
            raise ValueError(
                f"MSTDistill was built for {self.num_teachers} teachers and {self.num_classes} classes: expected "
                f"student_logits [..., {self.num_classes}] and teachers_logits {expected}, got "
                f"{tuple(student_logits.shape)} and {tuple(teachers_logits.shape)}"
            )
        if student_features is not None and student_features.shape[:-1] != leading_shape:
            raise ValueError(
                f"student_features {tuple(student_features.shape)} must have the logits' leading dims {tuple(leading_shape)}"
            )
        device = student_logits.device
        mask = valid_mask(mask, leading_shape, device)
        tensors = [student_logits, teachers_logits.detach()]
        if student_features is not None:
            tensors.append(student_features)
        rows = valid_rows(mask, *tensors, leading_dims=len(leading_shape))
        student_rows = as_float32(rows[0])
        teacher_rows = as_float32(rows[1]).to(student_rows.dtype)
        feature_rows = rows[2] if student_features is not None else None
        temperature = self.temperature

        # masking module: its own objective, gradient to the masks only
        masked = self.masked_teachers(teacher_rows)
        if self.masking:
            mask_rows = mask_reconstruction_rows(student_rows, masked, temperature=temperature)
            if self.mask_anchor:
                # reconstruction: each masked teacher stays close to the teacher it masks
                original = F.log_softmax(teacher_rows / temperature, dim=-1)
                moved = F.log_softmax(masked / temperature, dim=-1)
                mask_rows = mask_rows + self.mask_anchor * kl_rows(original, moved).sum(dim=-1) * (temperature**2)
        else:
            mask_rows = student_rows.new_zeros(student_rows.shape[0])
        targets = masked.detach()

        # router and top-k weights
        probs, log_probs = self.router_probs(student_rows, targets, feature_rows)
        weights = route_weights(probs, self.top_k, straight_through=self.router_objective == "routed")

        # the routed target and the student's KD
        teacher_log_probs = F.log_softmax(targets / temperature, dim=-1)  # [P, K, C]
        fixed = weights.detach()
        positive = fixed > 0
        log_fixed = torch.where(positive, torch.where(positive, fixed, torch.ones_like(fixed)).log(), torch.full_like(fixed, -math.inf))
        target_log_probs = torch.logsumexp(log_fixed.unsqueeze(-1) + teacher_log_probs, dim=-2)
        student_log_probs = F.log_softmax(student_rows / temperature, dim=-1)
        kd_rows = kl_rows(target_log_probs, student_log_probs) * (temperature**2)

        # the router's gradient from the KD term, student fixed, attached value-free
        if self.router_objective == "dense":
            dense_log_probs = torch.logsumexp(log_probs.unsqueeze(-1) + teacher_log_probs, dim=-2)
            router_rows = kl_rows(dense_log_probs, student_log_probs.detach()) * (temperature**2)
        else:
            signal = (teacher_log_probs.exp() * (target_log_probs - student_log_probs.detach()).unsqueeze(-2)).sum(dim=-1)
            router_rows = (weights * signal.detach()).sum(dim=-1) * (temperature**2)

        balance = load_balancing_loss(probs, mode=self.balance, log_probs=log_probs)
        per_row = (
            kd_rows
            + self.balance_weight * balance
            + (router_rows - router_rows.detach())
            + self.mask_weight * (mask_rows - mask_rows.detach())
        )
        self.last_weights = weights.detach()
        self.last_probs = probs.detach()
        rows_count = max(per_row.shape[0], 1)
        self.last_losses = {
            "kd": kd_rows.detach().sum() / rows_count,
            "balance": balance.detach(),
            "mask": mask_rows.detach().sum() / rows_count,
        }
        return reduce_rows(per_row, mask, leading_shape, reduction)

    def extra_repr(self) -> str:
        return (
            f"num_teachers={self.num_teachers}, num_classes={self.num_classes}, temperature={self.temperature}, "
            f"top_k={self.top_k}, router_input='{self.router_input}', balance='{self.balance}', "
            f"balance_weight={self.balance_weight}, masking={self.masking}, mask_weight={self.mask_weight}, "
            f"mask_anchor={self.mask_anchor}"
        )
