"""Feature- and relation-level distillation: hints, attention transfer, RKD, CKA.

References:

* A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for Thin
  Deep Nets", ICLR 2015 (:func:`feature_mse`).
* S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the Performance of
  Convolutional Neural Networks via Attention Transfer", ICLR 2017 (:func:`attention_transfer`).
* W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019
  (:func:`rkd_distance`, :func:`rkd_angle`).
* S. Kornblith, M. Norouzi, H. Lee, G. Hinton, "Similarity of Neural Network Representations
  Revisited", ICML 2019 (:func:`linear_cka`, :func:`cka_loss`, :func:`cka_table`).

Inputs are feature tensors ``[B, ...]`` (vectors ``[B, D]``, maps ``[B, C, H, W]``, tokens
``[B, N, D]``); ``mask`` is a boolean over the batch dim ``[B]`` (:func:`feature_mse` also takes a
token mask ``[B, N]``). As everywhere in :mod:`distill.losses`: masked rows are dropped before any
arithmetic, values are computed in float32 (float64 kept), the teacher is detached, and a fully
masked batch gives 0 with a zero gradient.

**Relation losses** (``rkd_distance``, ``rkd_angle``, ``cka_loss``) compare structures *over the
batch*: masked rows are removed from the relation matrices, not only from the sum. Their value is
written as a sum of per-anchor-row terms ``l_i`` (one per valid row, defined in each function), so
that ``reduction`` keeps its meaning: ``"batchmean"`` is the mean of the ``l_i`` (the loss of the
paper), ``"sum"`` their sum, ``"none"`` the ``l_i`` as ``[B]`` with 0 at masked rows. With too few
valid rows for one relation the value is 0 with a zero gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from distill.losses._common import (
    REDUCTIONS,
    as_float32,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES

# -- shared helpers ------------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got '{reduction}'")


def _check_batch(student: torch.Tensor, teacher: torch.Tensor, *, what: str) -> None:
    if student.dim() < 2 or teacher.dim() < 2:
        raise ValueError(
            f"{what}: features need a batch dim and feature dims, shape [B, ...]; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{what}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features "
            "have different batch sizes"
        )


def _batch_rows(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size]:
    """Valid rows ``[P, ...]`` of student and (detached) teacher in float32, the mask, ``[B]``."""
    leading_shape = student.shape[:1]
    mask = valid_mask(mask, leading_shape, student.device)
    student_rows, teacher_rows = valid_rows(mask, student, teacher.detach().to(student.device), leading_dims=1)
    student_rows = as_float32(student_rows)
    teacher_rows = as_float32(teacher_rows).to(student_rows.dtype)
    return student_rows, teacher_rows, mask, leading_shape


def _zeros_like_rows(rows: torch.Tensor) -> torch.Tensor:
    """Zeros ``[P]`` attached to the graph of ``rows`` with an exactly zero gradient (no NaN risk)."""
    return rows.flatten(1)[:, :0].sum(dim=-1)


def _relation_rows(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, reduction: str, *, what: str, minimum: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Size, torch.Tensor | None]:
    """Checked, flattened valid rows ``[P, D]`` of a relation loss, its mask and ``[B]``, and the
    value to return at once (0 with a zero gradient) when fewer than ``minimum`` rows are valid."""
    _check_batch(student, teacher, what=what)
    _check_reduction(reduction)
    student_rows, teacher_rows, mask, leading_shape = _batch_rows(student, teacher, mask)
    student_rows, teacher_rows = student_rows.flatten(1), teacher_rows.flatten(1)
    early = None
    if student_rows.shape[0] < minimum:
        early = reduce_rows(_zeros_like_rows(student_rows), mask, leading_shape, reduction)
    return student_rows, teacher_rows, mask, leading_shape, early


def huber(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Huber loss of ``x``: ``x^2 / 2`` for ``|x| <= delta``, ``delta (|x| - delta / 2)`` beyond."""
    absolute = x.abs()
    return torch.where(absolute <= delta, 0.5 * x * x, delta * (absolute - 0.5 * delta))


# -- FitNets hints -------------------------------------------------------------------------------


@LOSSES.register(
    "feature_mse",
    summary="FitNets hint: squared error between (adapted) student and teacher features (Romero et al. 2015).",
)
def feature_mse(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    normalize: bool = False,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, eq. 3).

    ``l = ||u_s - u_t||_2^2`` per position, summed over the feature dims, where ``u_s`` is the
    student's (adapted) feature and ``u_t`` the teacher's hint. The paper's ``1/2`` factor is not
    applied (put it in the term's weight). The paper's regressor ``r(.)`` is an adapter on the
    student's source, so both tensors must have the same shape.

    Positions: a 3-D input ``[B, N, D]`` is read as tokens, so the positions are the ``[B, N]``
    tokens and the sum runs over ``D`` (as logits ``[B, L, C]`` are read); any other shape
    ``[B, ...]`` (vectors, maps) has one position per sample, summed over all the other dims.
    ``mask`` is ``[B]`` (masks whole samples) or, for tokens, ``[B, N]``. ``batchmean`` averages over
    the valid positions. ``normalize=True`` L2-normalises each position's feature vector first
    (the value is then in ``[0, 4]``).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature_mse: student_features {tuple(student_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must have the same shape; put an adapter on the student's "
            "source that maps it to the teacher's shape"
        )
    if student_features.dim() < 2:
        raise ValueError(f"feature_mse: features need shape [B, ...], got {tuple(student_features.shape)}")
    _check_reduction(reduction)
    leading = 2 if student_features.dim() == 3 else 1
    leading_shape = student_features.shape[:leading]
    if mask is not None and leading == 2 and tuple(mask.shape) == tuple(student_features.shape[:1]):
        mask = mask.to(torch.bool).unsqueeze(1).expand(leading_shape)
    mask = valid_mask(mask, leading_shape, student_features.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_features, teacher_features.detach().to(student_features.device), leading_dims=leading
    )
    student_rows = as_float32(student_rows).flatten(1)
    teacher_rows = as_float32(teacher_rows).flatten(1).to(student_rows.dtype)
    if normalize:
        student_rows = F.normalize(student_rows, dim=-1)
        teacher_rows = F.normalize(teacher_rows, dim=-1)
    per_row = (student_rows - teacher_rows).pow(2).sum(dim=-1)
    return reduce_rows(per_row, mask, leading_shape, reduction)


# -- attention transfer --------------------------------------------------------------------------


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Activation-based spatial attention ``Q = sum_c |A_c|^p`` of maps ``[B, C, *S]`` -> ``[B, *S]``."""
    if p == 2.0:
        return features.pow(2).sum(dim=1)
    return features.abs().pow(p).sum(dim=1)


@LOSSES.register(
    "attention_transfer",
    summary="Attention transfer: distance of L2-normalised spatial attention maps (Zagoruyko & Komodakis 2017).",
    inputs="maps",
)
def attention_transfer(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    p: float = 2.0,
    beta: float = 1000.0,
    resize: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
    Attention: Improving the Performance of Convolutional Neural Networks via Attention Transfer",
    ICLR 2017, section 3.1 and eq. 2).

    For maps ``A`` of shape ``[B, C, H, W]`` (any number of spatial dims; the channel counts of
    student and teacher may differ), the attention map is ``Q = sum_c |A_c|^p``, flattened to a
    vector ``q`` of ``HW`` entries and L2-normalised. Per sample::

        l = beta / 2 * mean_hw (q_s / ||q_s|| - q_t / ||q_t||)^2

    This is the official code's form, ``beta / 2 * (at(x) - at(y)).pow(2).mean()`` with its
    default ``beta = 1000``: the squared L2 distance divided by the number of spatial positions
    ``HW`` (the paper's eq. 2 writes the unsquared p-norm; the code, whose results the paper
    reports, squares it and averages). The official code averages over channels instead of
    summing, which the normalisation cancels. ``batchmean`` averages over valid samples, so with
    ``beta = 1000`` it equals one layer's term of the official loss.

    If the spatial sizes differ and ``resize`` is True, the student's attention map ``Q_s`` (not
    its features) is resized to the teacher's size by (bi/tri)linear interpolation before the
    normalisation; with ``resize=False`` differing sizes raise ``ValueError``.
    """
    _check_batch(student_features, teacher_features, what="attention_transfer")
    if student_features.dim() < 3 or teacher_features.dim() != student_features.dim():
        raise ValueError(
            "attention_transfer: expects maps [B, C, H, W] (or [B, C, *spatial]) on both sides; got student "
            f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}"
        )
    if not p > 0:
        raise ValueError(f"attention_transfer: p must be > 0, got {p}")
    _check_reduction(reduction)
    student_size, teacher_size = student_features.shape[2:], teacher_features.shape[2:]
    if student_size != teacher_size and not resize:
        raise ValueError(
            f"attention_transfer: spatial sizes differ (student {tuple(student_features.shape)}, teacher "
            f"{tuple(teacher_features.shape)}); set resize: true or adapt the student's maps"
        )
    student_rows, teacher_rows, mask, leading_shape = _batch_rows(student_features, teacher_features, mask)
    q_student = attention_map(student_rows, p)
    q_teacher = attention_map(teacher_rows, p)
    if student_size != teacher_size:
        modes = {1: "linear", 2: "bilinear", 3: "trilinear"}
        if len(teacher_size) not in modes:
            raise ValueError(f"attention_transfer: cannot resize {len(teacher_size)}-D spatial maps")
        q_student = F.interpolate(
            q_student.unsqueeze(1), size=tuple(teacher_size), mode=modes[len(teacher_size)], align_corners=False
        ).squeeze(1)
    q_student = F.normalize(q_student.flatten(1), dim=-1)
    q_teacher = F.normalize(q_teacher.flatten(1), dim=-1)
    per_row = (beta / 2.0) * (q_student - q_teacher).pow(2).mean(dim=-1)
    return reduce_rows(per_row, mask, leading_shape, reduction)


# -- relational KD -------------------------------------------------------------------------------


def _gram_and_distances(rows: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix ``[P, P]`` of the centred rows and the pairwise Euclidean distances.

    Distances are translation invariant, so centring first only removes cancellation. The
    squared distances are clamped at ``eps`` before the root (the clamp's zero gradient keeps
    the diagonal and duplicate rows finite).
    """
    centred = rows - rows.mean(dim=0, keepdim=True)
    gram = centred @ centred.transpose(0, 1)
    squared_norms = gram.diagonal()
    squared = squared_norms.unsqueeze(0) + squared_norms.unsqueeze(1) - 2.0 * gram
    return gram, squared.clamp_min(eps).sqrt()


def _normalized_distances(rows: torch.Tensor) -> torch.Tensor:
    """``psi_D(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over pairs ``i != j``."""
    count = rows.shape[0]
    _, distances = _gram_and_distances(rows)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=rows.device)
    distances = distances * off_diagonal
    mean = distances.sum() / (count * (count - 1))
    return distances / mean.clamp_min(torch.finfo(rows.dtype).tiny)


@LOSSES.register(
    "rkd_distance",
    summary="RKD distance: Huber between mean-normalised pairwise distances of the batch (Park et al. 2019).",
)
def rkd_distance(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distance-wise RKD loss (Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. 4-5).

    Features ``[B, ...]`` are flattened to ``[B, D]`` (student and teacher ``D`` may differ). On
    the ``P`` valid rows, ``psi(i, j) = ||x_i - x_j||_2 / mu`` with ``mu`` the mean distance over the
    ``P (P - 1)`` ordered pairs ``i != j``, computed separately for student and teacher. With the
    Huber loss ``h`` (``delta = 1``, PyTorch's ``smooth_l1_loss``), the per-anchor term is::

        l_i = 1 / (P - 1) * sum_{j != i} h(psi_s(i, j) - psi_t(i, j))

    so ``batchmean`` is the mean over all ordered pairs ``i != j``. (The official code takes the
    mean over all ``P^2`` entries, zero diagonal included, i.e. ``(P - 1) / P`` times this, and
    its ``mu`` skips zero distances.) The paper weights this term by ``lambda_D = 25`` (put it in
    the term's weight). Fewer than 2 valid rows give 0.
    """
    student_rows, teacher_rows, mask, leading_shape, early = _relation_rows(
        student_features, teacher_features, mask, reduction, what="rkd_distance", minimum=2
    )
    if early is not None:
        return early
    count = student_rows.shape[0]
    psi_student = _normalized_distances(student_rows)
    with torch.no_grad():
        psi_teacher = _normalized_distances(teacher_rows)
    per_pair = huber(psi_student - psi_teacher)  # the diagonal is 0 - 0 -> 0
    per_row = per_pair.sum(dim=1) / (count - 1)
    return reduce_rows(per_row, mask, leading_shape, reduction)


def _angles(rows: torch.Tensor) -> torch.Tensor:
    """``cos[a, b, c]``: cosine of the angle at vertex ``x_a`` between ``x_b - x_a`` and ``x_c - x_a``.

    From the Gram matrix, ``<x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa``, so memory is
    ``P^3`` rather than ``P^2 D``. Entries with ``b = a`` or ``c = a`` are finite and meaningless
    (the caller drops them).
    """
    count = rows.shape[0]
    gram, distances = _gram_and_distances(rows)
    eye = torch.eye(count, dtype=torch.bool, device=rows.device)
    safe = torch.where(eye, torch.ones_like(distances), distances)
    diagonal = gram.diagonal()
    inner = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + diagonal.view(count, 1, 1)
    return inner / (safe.unsqueeze(2) * safe.unsqueeze(1))


@LOSSES.register(
    "rkd_angle",
    summary="RKD angle: Huber between cosines of the angles of all batch triplets (Park et al. 2019).",
)
def rkd_angle(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Angle-wise RKD loss (Park et al., "Relational Knowledge Distillation", CVPR 2019, eq. 6-7).

    Features ``[B, ...]`` are flattened to ``[B, D]`` (dims may differ). For valid rows ``a`` (the
    vertex), ``b``, ``c``, all distinct, ``psi(a, b, c) = <e_ab, e_ac>`` with
    ``e_ab = (x_b - x_a) / ||x_b - x_a||``. Per vertex::

        l_a = 1 / ((P - 1)(P - 2)) * sum_{b != a, c != a, b != c} h(psi_s(a, b, c) - psi_t(a, b, c))

    with ``h`` the Huber loss (``delta = 1``), so ``batchmean`` is the mean over all ordered
    triplets of distinct rows. (The official code averages over all ``P^3`` entries, degenerate
    ones included; the paper weights this term by ``lambda_A = 50``.) Fewer than 3 valid rows
    give 0.
    """
    student_rows, teacher_rows, mask, leading_shape, early = _relation_rows(
        student_features, teacher_features, mask, reduction, what="rkd_angle", minimum=3
    )
    if early is not None:
        return early
    count = student_rows.shape[0]
    psi_student = _angles(student_rows)
    with torch.no_grad():
        psi_teacher = _angles(teacher_rows)
    eye = torch.eye(count, dtype=torch.bool, device=student_rows.device)
    valid = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # a != b, a != c, b != c
    per_triplet = torch.where(valid, huber(psi_student - psi_teacher), torch.zeros_like(psi_student))
    per_row = per_triplet.sum(dim=(1, 2)) / ((count - 1) * (count - 2))
    return reduce_rows(per_row, mask, leading_shape, reduction)


# -- CKA -----------------------------------------------------------------------------------------


def _cka_parts(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row contributions ``r_i`` with ``sum_i r_i = CKA``, CKA) for rows ``[N, D1]``, ``[N, D2]``."""
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    gram_x = x @ x.transpose(0, 1)
    gram_y = y @ y.transpose(0, 1)
    denominator = (gram_x.pow(2).sum().sqrt() * gram_y.pow(2).sum().sqrt()).clamp_min(torch.finfo(x.dtype).tiny)
    per_row = (gram_x * gram_y).sum(dim=1) / denominator
    return per_row, per_row.sum()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
    ICML 2019, eq. 4 with the linear kernel) between ``x`` ``[N, D1]`` and ``y`` ``[N, D2]``.

    With ``X, Y`` centred over the ``N`` rows::

        CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) = <K, L>_F / (||K||_F ||L||_F),  K = X X^T, L = Y Y^T

    computed in the Gram form (``N x N``). In ``[0, 1]``; invariant to orthogonal transforms and
    isotropic scaling of either side; 0 when either side is constant (all rows equal). Other
    dims are flattened: ``[N, ...]``. float64 is kept, anything else computed in float32.
    """
    if x.dim() < 2 or y.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: expects [N, ...] and [N, ...] with the same N; got {tuple(x.shape)} and {tuple(y.shape)}")
    x = as_float32(x.flatten(1))
    y = as_float32(y.flatten(1)).to(x.dtype)
    return _cka_parts(x, y)[1]


@LOSSES.register(
    "cka_loss",
    summary="1 - linear CKA between student and teacher features over the batch (Kornblith et al. 2019).",
)
def cka_loss(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """``1 - CKA(X_s, X_t)`` over the valid rows of the batch (linear CKA, see :func:`linear_cka`).

    Features ``[B, ...]`` are flattened to ``[B, D]``; dims may differ. The value is a batch
    statistic, written as per-row terms so that ``reduction`` keeps its meaning: with
    ``CKA = sum_i r_i``, ``r_i = sum_j K_ij L_ij / (||K||_F ||L||_F)``, the term of row ``i`` is
    ``l_i = 1 - P r_i``. ``batchmean`` (mean of ``l_i``) is ``1 - CKA``; ``sum`` is ``P (1 - CKA)``;
    ``none`` gives the ``l_i`` (which can be negative individually). Fewer than 2 valid rows
    give 0. The teacher is detached.
    """
    student_rows, teacher_rows, mask, leading_shape, early = _relation_rows(
        student_features, teacher_features, mask, reduction, what="cka_loss", minimum=2
    )
    if early is not None:
        return early
    count = student_rows.shape[0]
    contributions, _ = _cka_parts(student_rows, teacher_rows)
    per_row = 1.0 - count * contributions
    return reduce_rows(per_row, mask, leading_shape, reduction)


@torch.no_grad()
def cka_table(
    student_feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, torch.Tensor]
) -> list[tuple[str, str, float]]:
    """Linear CKA of every (student, teacher) feature pair: ``[(student_name, teacher_name, cka)]``.

    A diagnostic (e.g. which student layer resembles which teacher layer, as in OFA-KD's
    motivation). Each tensor is ``[N, ...]`` over the same ``N`` samples and is flattened to
    ``[N, D]``; computed in float64 without gradient. Rows are in the dicts' order, student-major.
    """
    table: list[tuple[str, str, float]] = []
    for student_name, student in student_feats.items():
        x = student.detach().flatten(1).to(torch.float64)
        for teacher_name, teacher in teacher_feats.items():
            if teacher.shape[0] != student.shape[0]:
                raise ValueError(
                    f"cka_table: '{student_name}' has {student.shape[0]} samples but '{teacher_name}' has {teacher.shape[0]}"
                )
            y = teacher.detach().flatten(1).to(device=x.device, dtype=torch.float64)
            table.append((student_name, teacher_name, float(linear_cka(x, y))))
    return table


__all__ = [
    "attention_map",
    "attention_transfer",
    "cka_loss",
    "cka_table",
    "feature_mse",
    "huber",
    "linear_cka",
    "rkd_angle",
    "rkd_distance",
]
