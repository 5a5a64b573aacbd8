"""Dual-Head Knowledge Distillation (DHKD): a logit-level loss on an auxiliary head.

Reference: P. Yang, C.-C. Zong, S.-J. Huang, L. Feng, B. An, "Dual-Head Knowledge Distillation:
Enhancing Logits Utilization with an Auxiliary Head", arXiv 2411.08937 (2024, revised 2025); official
code: github.com/penghui-yang/DHKD (``distiller_zoo/BinaryKLNorm.py``, ``helper/loops.py``,
``models/classifier.py``).

The paper adds a *logit-level* loss to the usual *probability-level* ones (cross-entropy with the
labels, KL with the teacher): BinaryKL treats each class as a binary problem on the sigmoid of its
logit, so it sees information that the softmax removes (a shift of all logits). Put on the same
linear classifier as the cross-entropy, the two losses' gradients conflict in that classifier
(neural-collapse analysis) and the head collapses, while in the backbone they do not conflict. DHKD
therefore gives the logit-level loss its own classifier: the student's main head ``W1`` gets the
probability-level losses; an auxiliary head ``W2`` on the same penultimate features ``h`` gets the
logit-level loss; both train the backbone. At inference the auxiliary head is dropped.

Per position, with ``z_t`` the teacher's logits, ``z_s = W1 h`` the student's main logits and
``a = W2 h`` the auxiliary logits (``sigma`` the logistic sigmoid, ``T`` the temperature)::

    BinaryKL(a, z_t)      = T^2 sum_c KL( Bern(sigma(z_t,c / T)) || Bern(sigma(a_c / T)) )
    BinaryKL-Norm(a, z_t) = T^2 sum_c KL( Bern(1/2) || Bern(sigma((a_c - z_t,c) / T)) )

BinaryKL-Norm (the paper's final choice, the only loss on the auxiliary head in the official
``train_student.py --distill dhkd``) compares the *difference* of the logits with 0: it is 0 exactly
when ``a = z_t`` and depends on the logits only through ``a - z_t``. The official objective is
``gamma * CE(z_s, y) + alpha * BinaryKL-Norm_T(a, z_t)`` with ``gamma = alpha = 1``, ``T = 2``.

What :class:`DualHeadKD` returns, per position::

    logit_weight * LogitLoss_T(W2 h, z_t)  +  kd_weight * T_kd^2 KL(softmax(z_t / T_kd) || softmax(z_s / T_kd))

* The label cross-entropy on the main head is **not** included: add a ``cross_entropy`` term to
  the objective (weight ``gamma``), as every other loss here expects.
* ``kd_weight`` (default 0, as in the official DHKD objective) optionally adds Hinton's KL on the
  main head (the probability-level teacher loss the paper's framing allows); it is the only part
  whose gradient reaches the main head. The logit-level part reaches the auxiliary head and,
  through ``h``, the backbone, never ``W1``.
* ``logit_loss``: ``"binary_kl_norm"`` (default) or ``"binary_kl"``. Both are computed with
  ``logsigmoid`` (exact for any logit) instead of the official ``clamp(sigmoid, 1e-8, 1 - 1e-8)``,
  which zeroes the gradient once ``|a - z_t| / T`` exceeds about 18.
* ``aux_head``: ``"linear"`` (default; a ``Linear(D, C)``, as the official ImageNet runs) or
  ``"nonlinear"`` (the official CIFAR option: ``Linear(D, aux_hidden) -> Dropout(aux_dropout) ->
  BatchNorm1d -> ReLU -> Linear(aux_hidden, C)``, ``aux_hidden = 200``, ``aux_dropout = 0.1``;
  like any BatchNorm it needs two or more valid positions per training batch).
* The official code can also align the two losses' gradients with a PCGrad-style projection in
  the optimizer (``--ga``); that is an optimizer change and is not part of this loss.

The head is built from ``input_shapes["student_features"]`` (last dim = ``D``, whatever source the
term's ``student_features`` reads) and ``num_classes``;
it lives in the objective (trained with the student, checkpointed under ``objective.losses.``),
not in the student, so the exported student has no trace of it.
"""

from __future__ import annotations

import math
from typing import Mapping

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
from distill.losses.kd import kl_per_position
from distill.registry import LOSSES

LOGIT_LOSSES: tuple[str, ...] = ("binary_kl_norm", "binary_kl")
AUX_HEADS: tuple[str, ...] = ("linear", "nonlinear")


def binary_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 sum_c KL(Bern(sigma(z_t/T)) || Bern(sigma(z_s/T)))`` for rows ``[P, C]`` -> ``[P]``."""
    student = student_logits / temperature
    teacher = teacher_logits / temperature
    log_p, log_not_p = F.logsigmoid(teacher), F.logsigmoid(-teacher)
    log_q, log_not_q = F.logsigmoid(student), F.logsigmoid(-student)
    per_class = log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)
    return per_class.sum(dim=-1).clamp_min(0.0) * (temperature**2)


def binary_kl_norm_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 sum_c KL(Bern(1/2) || Bern(sigma((z_s - z_t)/T)))`` for rows ``[P, C]`` -> ``[P]``.

    ``KL(Bern(1/2) || Bern(sigma(d))) = -log 2 - (log sigma(d) + log sigma(-d)) / 2``.
    """
    difference = (student_logits - teacher_logits) / temperature
    per_class = -math.log(2.0) - 0.5 * (F.logsigmoid(difference) + F.logsigmoid(-difference))
    return per_class.sum(dim=-1).clamp_min(0.0) * (temperature**2)


_ROW_FUNCTIONS = {"binary_kl_norm": binary_kl_norm_rows, "binary_kl": binary_kl_rows}


def _logit_level(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape))
    student_rows = as_float32(student_rows)
    per_row = _ROW_FUNCTIONS[name](student_rows, as_float32(teacher_rows).to(student_rows.dtype), temperature)
    return reduce_rows(per_row, mask, leading_shape, reduction)


def binary_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """BinaryKL of DHKD (Yang et al. 2024, sec. 3): a per-class Bernoulli KL on ``sigma(z / T)``, times ``T^2``."""
    return _logit_level("binary_kl", student_logits, teacher_logits, temperature, mask, reduction)


def binary_kl_norm(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """BinaryKL-Norm of DHKD: ``T^2 sum_c KL(Bern(1/2) || Bern(sigma((z_s,c - z_t,c) / T)))``, 0 iff ``z_s = z_t``."""
    return _logit_level("binary_kl_norm", student_logits, teacher_logits, temperature, mask, reduction)


class _NonLinearHead(torch.nn.Sequential):
    """The official CIFAR auxiliary head: Linear -> Dropout -> BatchNorm1d -> ReLU -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(
            torch.nn.Linear(in_features, hidden),
            torch.nn.Dropout(p=dropout),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, num_classes),
        )


@LOSSES.register(
    "dual_head_kd",
    summary="Dual-Head KD: BinaryKL(-Norm) on an auxiliary head over the student's features (Yang et al. 2024).",
)
class DualHeadKD(torch.nn.Module):
    """Dual-Head KD (Yang et al. 2024): the logit-level loss on an auxiliary head, optional main-head KL.

    Tensor inputs: ``student_features`` ``[..., D]`` (the input of the student's last linear layer,
    source ``student.features``), ``student_logits`` ``[..., C]`` (main head), ``teacher_logits``
    ``[..., C]``. Returns ``logit_weight * LogitLoss_T(aux_head(h), z_t) + kd_weight *
    HintonKD_{T_kd}(z_s, z_t)`` (see the module docstring); CE with the labels is a separate term.
    Computed in float32; ``mask``/``reduction`` as in :mod:`distill.losses._common`.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shapes: Mapping[str, tuple[int, ...]],
        logit_loss: str = "binary_kl_norm",
        temperature: float = 2.0,
        logit_weight: float = 1.0,
        kd_weight: float = 0.0,
        kd_temperature: float = 4.0,
        aux_head: str = "linear",
        aux_hidden: int = 200,
        aux_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"logit_loss must be one of {LOGIT_LOSSES}, got '{logit_loss}'")
        if aux_head not in AUX_HEADS:
            raise ValueError(f"aux_head must be one of {AUX_HEADS}, got '{aux_head}'")
        check_temperature(temperature)
        check_temperature(kd_temperature)
        if logit_weight < 0 or kd_weight < 0:
            raise ValueError(f"logit_weight and kd_weight must be >= 0, got {logit_weight} and {kd_weight}")
        if "student_features" not in input_shapes:
            raise ValueError("DualHeadKD needs the shape of student_features to size its auxiliary head")
        shape = tuple(input_shapes["student_features"])
        if not shape:
            raise ValueError(f"student_features has no feature dimension (shape {shape})")
        self.in_features = int(shape[-1])
        self.num_classes = int(num_classes)
        self.logit_loss = logit_loss
        self.temperature = float(temperature)
        self.logit_weight = float(logit_weight)
        self.kd_weight = float(kd_weight)
        self.kd_temperature = float(kd_temperature)
        self.aux_kind = aux_head
        if aux_head == "linear":
            self.aux_head: torch.nn.Module = torch.nn.Linear(self.in_features, self.num_classes)
        else:
            self.aux_head = _NonLinearHead(self.in_features, self.num_classes, int(aux_hidden), float(aux_dropout))

    def aux_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The auxiliary head's logits ``[..., C]`` for features ``[..., D]`` (in the head's dtype)."""
        dtype = next(self.aux_head.parameters()).dtype
        flat = features.reshape(-1, features.shape[-1]).to(dtype)
        if flat.shape[0] == 0:
            # Nothing to classify: no call (BatchNorm cannot run on an empty batch), still connected.
            logits = flat.new_zeros((0, self.num_classes)) + flat.sum() * 0
        else:
            logits = self.aux_head(flat)
        return logits.reshape(*features.shape[:-1], self.num_classes)

    def forward(
        self,
        student_features: torch.Tensor,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        check_logits(student_logits, teacher_logits)
        if student_logits.shape[-1] != self.num_classes:
            raise ValueError(f"the logits have {student_logits.shape[-1]} classes, the auxiliary head {self.num_classes}")
        if student_features.shape[:-1] != student_logits.shape[:-1] or student_features.shape[-1] != self.in_features:
            raise ValueError(
                f"student_features {tuple(student_features.shape)} must be [..., {self.in_features}] with the "
                f"logits' leading dims {tuple(student_logits.shape[:-1])}"
            )
        leading_shape = student_logits.shape[:-1]
        mask = valid_mask(mask, leading_shape, student_logits.device)
        feature_rows, student_rows, teacher_rows = valid_rows(
            mask, student_features, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
        )
        aux = as_float32(self.aux_logits(feature_rows))
        teacher_rows = as_float32(teacher_rows).to(aux.dtype)
        per_row = self.logit_weight * _ROW_FUNCTIONS[self.logit_loss](aux, teacher_rows, self.temperature)
        if self.kd_weight > 0:
            tk = self.kd_temperature
            student_log_probs = F.log_softmax(as_float32(student_rows).to(aux.dtype) / tk, dim=-1)
            teacher_log_probs = F.log_softmax(teacher_rows / tk, dim=-1)
            per_row = per_row + self.kd_weight * (tk**2) * kl_per_position(teacher_log_probs, student_log_probs)
        return reduce_rows(per_row, mask, leading_shape, reduction)

    def extra_repr(self) -> str:
        return (
            f"logit_loss='{self.logit_loss}', temperature={self.temperature}, logit_weight={self.logit_weight}, "
            f"kd_weight={self.kd_weight}, kd_temperature={self.kd_temperature}, aux_head='{self.aux_kind}'"
        )
