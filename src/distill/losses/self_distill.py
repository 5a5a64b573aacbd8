"""Self-distillation with weighted ground-truth targets.

Reference: K. Borup, L. N. Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets
Dampen Regularization Imposed by Self-Distillation", NeurIPS 2021 (arXiv 2102.13088).
Official code: github.com/Kennethborup/self_distillation (``self_distiller.py``, ``toy_example.ipynb``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_logits,
    check_temperature,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.registry import LOSSES


def weighted_targets(
    teacher_logits: torch.Tensor, labels: torch.Tensor, *, ground_truth_weight: float, temperature: float
) -> torch.Tensor:
    """``xi * onehot(labels) + (1 - xi) * softmax(teacher_logits / T)`` over the last dim."""
    onehot = F.one_hot(labels.long(), teacher_logits.shape[-1]).to(teacher_logits.dtype)
    soft = F.softmax(teacher_logits / temperature, dim=-1)
    return ground_truth_weight * onehot + (1.0 - ground_truth_weight) * soft


@LOSSES.register(
    "gt_weighted_kd",
    summary="Self-distillation to xi*onehot + (1-xi)*teacher soft targets, by cross-entropy (Borup & Andersen 2021).",
)
def gt_weighted_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ground_truth_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Cross-entropy to the ground-truth-weighted target of Borup & Andersen (2021).

    With ``xi = ground_truth_weight`` (the paper's ``alpha``), per position::

        target = xi * onehot(y) + (1 - xi) * softmax(z_t / T)
        loss   = -sum_c target_c * log softmax(z_s / T)_c

    ``xi = 1`` is the plain cross-entropy with the labels (at ``T = 1``), ``xi = 0`` the
    cross-entropy to the teacher's soft targets (Hinton KD without the ``T^2`` factor, up to the
    teacher's entropy). The paper analyses the weighted *squared* error in kernel ridge
    regression (its ResNet code uses MSE on softmax outputs, ``alpha * mse(gt) + (1 - alpha) *
    mse(teacher)``); for classification we use cross-entropy, for which the weighted sum of the
    two losses and the loss to the weighted target are the same thing. The student's logits are
    scaled by the same ``T`` as the teacher's; no ``T^2`` factor. The value is ``>= 0`` (a
    cross-entropy) but not 0 at ``student == teacher``. Positions labelled ``ignore_index`` are
    masked; teacher detached; float32. See :func:`optimal_ground_truth_weight` for choosing ``xi``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but student_logits' leading dims are "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if not 0.0 <= ground_truth_weight <= 1.0:
        raise ValueError(f"ground_truth_weight must be in [0, 1], got {ground_truth_weight}")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    labels = labels.to(student_logits.device)
    label_valid = labels != ignore_index
    mask = label_valid if mask is None else (mask & label_valid)
    student_rows, teacher_rows, label_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), labels, leading_dims=len(leading_shape)
    )
    student_log_probs = F.log_softmax(as_float32(student_rows) / temperature, dim=-1)
    targets = weighted_targets(
        as_float32(teacher_rows).to(student_log_probs.dtype),
        label_rows,
        ground_truth_weight=ground_truth_weight,
        temperature=temperature,
    )
    per_row = (-(targets * student_log_probs).sum(dim=-1)).clamp_min(0.0)
    return reduce_rows(per_row, mask, leading_shape, reduction)


def optimal_ground_truth_weight(
    ground_truth_fit: torch.Tensor,
    teacher_fit: torch.Tensor,
    targets: torch.Tensor,
    *,
    clip: bool = True,
) -> float:
    """Estimate of the optimal ground-truth weight ``xi*`` from two fits (Borup & Andersen 2021).

    In kernel ridge regression the fit at a distillation step is linear in its targets, so the
    fit obtained with weight ``xi`` is ``f_xi = xi * f_1 + (1 - xi) * f_0``: ``f_1`` is the fit to
    the ground truth alone (``xi = 1``), ``f_0`` the fit to the teacher's outputs alone
    (``xi = 0``). The squared error ``||f_xi - y||^2`` is then a parabola in ``xi`` and its
    minimizer is the closed form::

        xi* = <f_1 - f_0, y - f_0> / ||f_1 - f_0||^2

    With ``y`` the noise-free targets this is the paper's optimal weight for the step; in
    practice (and in the paper's recipe for deep networks) ``y`` are held-out ground-truth
    targets and ``f_1``, ``f_0`` the predictions on that held-out data of two students trained
    with ``xi = 1`` and ``xi = 0``, which replaces a grid search over ``xi`` by two trainings.

    Assumptions: the fit is (approximately) affine in the target weighting (exact for kernel
    ridge regression and linearized networks, an approximation for trained deep networks); the
    error measure is the squared error; ``targets`` and fits are on data not used for fitting.

    ``ground_truth_fit`` and ``teacher_fit`` are predictions of the same shape (e.g. softmax
    outputs ``[N, C]``); ``targets`` has that shape too, or is integer labels ``[N]`` (turned into
    one-hot vectors). Returns ``xi*`` clipped to ``[0, 1]`` unless ``clip=False``. Raises
    ``ValueError`` when the two fits coincide (every weight is then optimal).
    """
    f1 = torch.as_tensor(ground_truth_fit).detach().to(torch.float64)
    f0 = torch.as_tensor(teacher_fit).detach().to(torch.float64)
    y = torch.as_tensor(targets).detach()
    if f1.shape != f0.shape:
        raise ValueError(f"ground_truth_fit {tuple(f1.shape)} and teacher_fit {tuple(f0.shape)} must have the same shape")
    if not torch.is_floating_point(y) and y.dim() == f1.dim() - 1:
        y = F.one_hot(y.long(), f1.shape[-1])
    y = y.to(torch.float64)
    if y.shape != f1.shape:
        raise ValueError(f"targets have shape {tuple(y.shape)}, expected {tuple(f1.shape)} or integer labels")
    direction = f1 - f0
    denominator = float((direction * direction).sum())
    if denominator == 0.0:
        raise ValueError("the two fits are identical, so every ground-truth weight gives the same fit")
    weight = float((direction * (y - f0)).sum()) / denominator
    return min(max(weight, 0.0), 1.0) if clip else weight
