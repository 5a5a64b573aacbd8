"""Divergences between a student and a teacher known only on a cached top-k support.

An offline teacher cache (:mod:`distill.cache`) stores, per token position, the teacher's ``k``
largest log-probabilities ``log p_i`` (temperature 1, normalized over the whole vocabulary),
their token ids ``S = {i_1, ..., i_k}`` and ``log p_rest = log(1 - sum_S p)``, the log of the
mass outside ``S``. :func:`sparse_kd` trains a student from that, in three ways of treating the
unknown mass outside ``S`` (``tail``), with the forward KL, the reverse KL, GKD's generalized JSD
or the total variation distance.

In YAML (the three teacher tensors come from the sources ``teacher.topk_logprobs``,
``teacher.topk_ids`` and ``teacher.tail_logmass``)::

    terms:
      - name: kd
        loss: sparse_kd
        params: {divergence: forward_kl, tail: bucket}

References:

* Top-k teacher caches for offline distillation, e.g. arcee-ai's DistillKit, which stores a
  teacher's top-k logits and offers "missing probability handling" options for the mass outside
  them (``zero``: treat it as absent, our ``ignore``; ``uniform``: spread it evenly over the other
  tokens; our ``bucket`` keeps it as one lumped category instead, without assuming its shape).
* G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015 (KL to
  the teacher's soft targets at a temperature).
* Y. Gu, L. Dong, F. Wei, M. Huang, "MiniLLM: Knowledge Distillation of Large Language Models",
  ICLR 2024 (reverse KL).
* R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem, "On-Policy
  Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024 (GKD),
  eq. 1: the generalized JSD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses._common import (
    check_temperature,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.losses.divergences import _check_unit_interval, log_mixture
from distill.registry import LOSSES

SPARSE_DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "generalized_jsd", "tvd")
TAIL_RULES: tuple[str, ...] = ("ignore", "renormalize", "bucket")
_LOG_2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on the whole range (Maechler 2012: ``log(-expm1 x)``
    near 0, ``log1p(-exp x)`` below ``-log 2``)."""
    return torch.where(x > -_LOG_2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _floor_with_gradient(x: torch.Tensor, ceiling: float) -> torch.Tensor:
    """``min(x, ceiling)`` in value, with the gradient of ``x`` itself (straight through)."""
    return x + (x.clamp(max=ceiling) - x).detach()


def _divergence_rows(
    divergence: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-row divergence between teacher ``log_p`` and student ``log_q``, both ``[P, C]``.

    ``log_p`` may hold ``-inf`` (a category the teacher gives no mass): such a category contributes
    ``0 * log 0 = 0`` wherever the teacher's probability multiplies, and nothing to the reverse KL.
    ``log_q`` is finite. No clamp here.
    """
    has_mass = log_p > float("-inf")
    log_p_safe = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    p = log_p.exp()
    zero = torch.zeros_like(log_q)
    if divergence == "generalized_jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "generalized_jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return torch.where(has_mass, p * (log_p_safe - log_q), zero).sum(dim=-1)
    if divergence == "reverse_kl":
        return torch.where(has_mass, log_q.exp() * (log_q - log_p_safe), zero).sum(dim=-1)
    if divergence == "generalized_jsd":
        log_m = log_mixture(log_p, log_q, beta)  # finite: log_q is
        teacher_part = torch.where(has_mass, p * (log_p_safe - log_m), zero).sum(dim=-1)
        student_part = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
        return beta * teacher_part + (1.0 - beta) * student_part
    return 0.5 * (p - log_q.exp()).abs().sum(dim=-1)  # tvd


def _check_inputs(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_tail: torch.Tensor,
    labels: torch.Tensor | None,
) -> None:
    if student_logits.dim() < 2:
        raise ValueError(f"sparse_kd: student_logits must be [B, T, V] or [N, V], got {tuple(student_logits.shape)}")
    leading = tuple(student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    if teacher_logprobs.dim() != student_logits.dim() or tuple(teacher_logprobs.shape[:-1]) != leading:
        raise ValueError(
            f"sparse_kd: teacher_logprobs {tuple(teacher_logprobs.shape)} must be [..., k] over the student's "
            f"positions {leading}"
        )
    k = teacher_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"sparse_kd: the top-k size must lie in 1..{vocab} (the vocabulary), got k={k}")
    if tuple(teacher_ids.shape) != tuple(teacher_logprobs.shape):
        raise ValueError(
            f"sparse_kd: teacher_ids {tuple(teacher_ids.shape)} must have the shape of teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)}"
        )
    if teacher_ids.is_floating_point() or teacher_ids.is_complex():
        raise ValueError(f"sparse_kd: teacher_ids must be integer token ids, got {teacher_ids.dtype}")
    if tuple(teacher_tail.shape) != leading:
        raise ValueError(f"sparse_kd: teacher_tail {tuple(teacher_tail.shape)} must have the positions' shape {leading}")
    if labels is not None and tuple(labels.shape) != leading:
        raise ValueError(f"sparse_kd: labels {tuple(labels.shape)} must have the positions' shape {leading}")


@LOSSES.register(
    "sparse_kd",
    summary="KD from a cached teacher top-k (log-probs, ids, tail mass): forward/reverse KL, generalized JSD or TVD, "
    "with the mass outside the top-k ignored, renormalized away or kept as one bucket.",
)
def sparse_kd(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_tail: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``kd_weight * D(p_teacher, q_student) + ce_weight * CE(student, labels)`` per valid token,
    with the teacher known only on its cached top-k support ``S``.

    Inputs: ``student_logits`` ``[B, T, V]`` (or ``[N, V]``, any float dtype; computed in float32,
    float64 kept); ``teacher_logprobs`` ``[..., k]`` the teacher's log-probabilities at temperature 1,
    normalized over the whole vocabulary; ``teacher_ids`` ``[..., k]`` their token ids (distinct per
    position, any order; not checked); ``teacher_tail`` ``[...]`` ``log(1 - sum_S p)``, the log of
    the teacher's mass outside ``S`` (``-inf`` when ``k = V`` or when that mass is 0); ``labels``
    ``[...]`` optional, ``-100`` for no target. Valid positions are ``mask & (labels != -100)``
    (either part optional); they are selected before any arithmetic, so invalid positions may hold
    anything (NaN, ``-inf``, out-of-range ids) without reaching the value or the gradient. The
    teacher tensors are detached.

    **Temperature** ``T``. The student is ``q = softmax(z_s / T)`` over the full vocabulary. The
    teacher is first made a distribution over ``k + 1`` categories, ``S`` plus a pseudo-token
    "rest" whose log-probability is ``teacher_tail``; all ``k + 1`` log-probabilities are divided
    by ``T`` and renormalized: ``log p_c = l_c / T - logsumexp_{c' in S + rest}(l_{c'} / T)``. At
    ``T = 1`` this is the cached distribution itself (its ``k + 1`` masses sum to 1, so the
    renormalization only removes storage rounding). At ``T != 1`` the rest is an **approximation**:
    the cache holds only temperature-1 values, and the true tempered rest mass is
    ``sum_{o not in S} p_o^{1/T} / Z``, not ``(sum_o p_o)^{1/T} / Z`` (larger for ``T > 1``,
    smaller for ``T < 1``); it also shifts the normalizer ``Z`` of the tokens in ``S``, so
    ``ignore`` and ``bucket`` inherit the approximation. ``renormalize`` is exact at every ``T``
    (the normalizer cancels). Like the dense divergences of :mod:`distill.losses.divergences`,
    **no** ``T^2`` factor is applied; put it in the term's weight if wanted.

    **tail** - what happens to the mass outside ``S``:

    * ``"ignore"``: teacher probabilities outside ``S`` are taken as zero: the teacher vector is
      ``p_i`` on ``S`` (not renormalized, summing to ``1 - p_rest``; at ``T = 1`` simply
      ``exp(teacher_logprobs)``), the student ``q_i = softmax(z_s / T)_i`` over the full
      vocabulary, read at ``S``. Every divergence is summed over ``S`` only; the student's mass
      outside ``S`` enters nothing (in the reverse KL only ``sum_S q_i (log q_i - log p_i)``).
      These are not divergences between distributions: the forward KL
      ``sum_S p_i log(p_i / q_i)`` is 0 when ``q = p`` on ``S`` but is minimized by
      ``q = p / sum_S p`` on ``S`` (value ``(1 - p_rest) log(1 - p_rest) < 0``), i.e. it pushes
      all of the student's mass onto ``S``, and the reverse KL may be negative too; so these two
      are **not clamped** at 0. DistillKit's ``zero`` option.
    * ``"renormalize"``: both sides renormalized over ``S``: ``p~_i = p_i / sum_S p`` and
      ``q~ = softmax`` of the student's logits restricted to ``S``; the divergence between these
      two distributions on ``k`` categories. The student's mass outside ``S`` is unconstrained.
    * ``"bucket"`` (default): ``S`` plus one category "rest": the teacher's rest mass
      ``p_rest = exp(teacher_tail)`` (tempered as above), the student's ``q_rest = 1 - sum_S q_i``,
      computed in log space as ``log1mexp(logsumexp_S log q_i)``; the divergence between the two
      distributions on ``k + 1`` categories. Where ``sum_S q_i`` rounds to 1 (the student's rest
      mass is below the dtype's resolution ``eps``: 1.2e-7 in float32), ``q_rest`` is floored at
      ``eps`` in value while the gradient passes straight through the floor, so a student
      saturated on ``S`` is still pulled toward the teacher's rest mass.

    **Zero teacher mass.** Where the teacher's probability of a category is exactly 0
    (``teacher_tail = -inf``, or a cached ``-inf``), ``0 * log 0 = 0``: its terms of the forward KL
    and of the teacher half of the JSD vanish, with no NaN or inf in value or gradient; in the
    reverse KL its term, ``q_c (log q_c - log 0)``, is **dropped** (it would be ``+inf`` unless
    ``q_c = 0``). With ``k = V`` this is exact: then ``q_rest = 0`` as well, the rest category
    vanishes, and every rule gives the dense loss of the same divergence at the same temperature
    (:func:`distill.losses.forward_kl`, ``reverse_kl``, ``generalized_jsd``, ``total_variation``)
    to rounding (with the bucket, the floored ``q_rest`` adds at most ``eps / 2`` to the TVD and
    ``(1 - beta) eps log(1 / (1 - beta))`` to the JSD).

    **divergence** (``p`` the teacher, ``q`` the student, sums over the rule's categories):

    * ``"forward_kl"``: ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` (Hinton et al. 2015).
    * ``"reverse_kl"``: ``KL(q || p) = sum_c q_c (log q_c - log p_c)`` (Gu et al. 2024, MiniLLM).
    * ``"generalized_jsd"``: ``beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q``
      (Agarwal et al. 2024, GKD, eq. 1): ``beta`` weights the **teacher**, exactly as the dense
      :func:`distill.losses.generalized_jsd`; ``beta = 0`` is the forward KL and ``beta = 1`` the
      reverse KL, as there.
    * ``"tvd"``: ``1/2 sum_c |p_c - q_c|``.

    Each is clamped at 0 per position (rounding), except the forward and reverse KL under
    ``ignore``, which can be legitimately negative (above).

    ``ce_weight`` adds the label cross-entropy ``-log softmax(z_s)_y`` at temperature 1 per valid
    token (it needs ``labels``; through an objective, name ``labels: batch.labels`` in the term's
    ``inputs``, since an optional tensor argument is passed only when named there).
    ``reduction``: ``"batchmean"`` (sum over valid tokens / their number), ``"sum"`` (what the
    engine uses, dividing by the optimizer step's valid-token count itself) or ``"none"`` (per
    position, 0 at invalid ones). Memory: one ``log_softmax`` over the valid rows (none for
    ``renormalize`` without CE), then ``torch.gather`` at ``S``; everything else is ``[P, k+1]``.

    In YAML::

        - name: kd
          loss: sparse_kd
          params: {divergence: forward_kl, tail: bucket}
    """
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(f"sparse_kd: divergence must be one of {SPARSE_DIVERGENCES}, got '{divergence}'")
    if tail not in TAIL_RULES:
        raise ValueError(f"sparse_kd: tail must be one of {TAIL_RULES}, got '{tail}'")
    check_temperature(temperature)
    _check_unit_interval("beta", beta, include_one=True)
    if ce_weight and labels is None:
        raise ValueError(
            "sparse_kd: ce_weight > 0 needs labels (in an objective: inputs: {labels: batch.labels})"
        )
    _check_inputs(student_logits, teacher_logprobs, teacher_ids, teacher_tail, labels)

    device = student_logits.device
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, device)
    if labels is not None:
        labels = labels.to(device)
        has_target = labels != -100
        mask = has_target if mask is None else mask & has_target
    tensors = [student_logits, teacher_logprobs.detach().to(device), teacher_ids.to(device), teacher_tail.detach().to(device)]
    if labels is not None:
        tensors.append(labels)
    rows = valid_rows(mask, *tensors, leading_dims=len(leading_shape))
    student_rows, lp_rows, id_rows, tail_rows = rows[:4]
    label_rows = rows[4] if labels is not None else None
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    id_rows = id_rows.long()
    lp_rows = lp_rows.to(dtype)
    tail_rows = tail_rows.to(dtype)
    inv_t = 1.0 / temperature

    per_row = student_rows.new_zeros(student_rows.shape[0], dtype=dtype)
    log_q_full: torch.Tensor | None = None  # student log-probs over V at temperature T
    if kd_weight:
        # the teacher at temperature T: S and the rest as k + 1 categories, renormalized
        if tail == "renormalize":
            scaled = lp_rows * inv_t if temperature != 1.0 else lp_rows
            log_p = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
            student_s = student_rows.gather(-1, id_rows).to(dtype)
            student_s = student_s * inv_t if temperature != 1.0 else student_s
            log_q = student_s - torch.logsumexp(student_s, dim=-1, keepdim=True)
        else:
            categories = torch.cat([lp_rows, tail_rows.unsqueeze(-1)], dim=-1)
            categories = categories * inv_t if temperature != 1.0 else categories
            log_p = categories - torch.logsumexp(categories, dim=-1, keepdim=True)
            if temperature == 1.0:
                log_q_full = F.log_softmax(student_rows, dim=-1, dtype=dtype)
            else:
                log_q_full = F.log_softmax(student_rows.to(dtype) * inv_t, dim=-1)
            log_q = log_q_full.gather(-1, id_rows)
            if tail == "ignore":
                log_p = log_p[..., :-1]
            else:
                eps = torch.finfo(dtype).eps
                on_support = _floor_with_gradient(torch.logsumexp(log_q, dim=-1), -eps)
                log_q = torch.cat([log_q, log1mexp(on_support).unsqueeze(-1)], dim=-1)
        value = _divergence_rows(divergence, log_p, log_q, beta)
        is_kl = divergence in ("forward_kl", "reverse_kl") or (divergence == "generalized_jsd" and beta in (0.0, 1.0))
        if not (tail == "ignore" and is_kl):
            value = value.clamp_min(0.0)
        per_row = per_row + kd_weight * value
    if ce_weight:
        assert label_rows is not None
        targets = label_rows.long().unsqueeze(-1)
        if log_q_full is not None and temperature == 1.0:
            nll = -log_q_full.gather(-1, targets).squeeze(-1)
        else:
            nll = -F.log_softmax(student_rows, dim=-1, dtype=dtype).gather(-1, targets).squeeze(-1)
        per_row = per_row + ce_weight * nll
    return reduce_rows(per_row, mask, leading_shape, reduction)
