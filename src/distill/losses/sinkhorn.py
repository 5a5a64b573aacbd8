"""Sinkhorn Knowledge Distillation (SinKD), batch-wise formulation.

Reference: X. Cui, Y. Qin, Y. Gao, E. Zhang, Z. Xu, T. Wu, K. Li, X. Sun, W. Zhou, H. Li,
"Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024 (arXiv 2402.17110).
Official code: github.com/2018cx/SinKD, ``loss.py`` (class ``saliency_mse``, methods
``sinkhorn_loss`` / ``sinkhorn_normalized``; the same code is in ``GPT-Neo/lossd.py``).
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


def sinkhorn_plan(cost: torch.Tensor, *, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic transport plan of SinKD for a cost matrix ``[N, M]``.

    The Gibbs kernel ``K = exp(-cost / epsilon)`` is rescaled ``iterations`` times, each time
    first so that every row sums to 1, then so that every column sums to 1 (Sinkhorn-Knopp with
    unit marginals, exactly the official ``sinkhorn_normalized``). It is computed in the log
    domain (``log K = -cost / epsilon`` and ``logsumexp`` normalizations), which is the same
    matrix but cannot underflow to an all-zero row and divide 0 by 0 when ``epsilon`` is small.
    Differentiable with respect to ``cost``.
    """
    log_plan = -cost / epsilon
    for _ in range(iterations):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True)
    return log_plan.exp()


@LOSSES.register(
    "sinkhorn",
    summary="SinKD: batch-wise Sinkhorn distance between student and teacher probabilities (Cui et al. 2024).",
)
def sinkhorn(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    plan_gradient: bool = True,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Batch-wise Sinkhorn distance of SinKD (Cui et al. 2024), as in the official code.

    The valid positions (all leading dims flattened, masked ones dropped first) form one batch
    of ``N`` samples. With ``s_i = softmax(z_s,i / T)`` and ``t_j = softmax(z_t,j / T)``:

    * cost: ``W_ij = ||s_i - t_j||_1``, the L1 distance between the student's distribution of
      sample ``i`` and the teacher's of sample ``j`` (``torch.cdist(p_s, p_t, p=1)`` in the code),
      an ``N x N`` matrix over the *batch* (the batch-wise reformulation: transport is between
      samples, not between classes);
    * entropic regularization: the kernel ``exp(-W / epsilon)``, ``epsilon = 0.1`` in the code;
    * plan: ``iterations`` (20 in the code) alternating row / column normalizations of the kernel
      (see :func:`sinkhorn_plan`), which converge to the doubly stochastic plan ``P`` (unit row
      and column sums) of the entropic optimal transport problem;
    * value: ``sum_ij P_ij W_ij`` (the code's ``torch.sum(P * Wxy)``).

    ``reduction="sum"`` gives that total, ``"batchmean"`` divides it by ``N`` (= the transport
    cost with uniform ``1/N`` marginals), and ``"none"`` gives sample ``i``'s share of the cost,
    its row of the plan: ``sum_j P_ij W_ij`` (0 at masked positions); the rows add up to the
    ``"sum"`` value. Because of the coupling across the batch these per-sample values depend on
    the other samples, and the loss of a batch is not the sum of the losses of its parts.

    Gradient: the student gets gradient through the cost *and* through the plan, as in the
    official code (no ``detach``); ``plan_gradient=False`` computes the plan without gradient
    (only ``<P, W>``'s explicit dependence on ``W`` is differentiated, the envelope-theorem
    approximation common in OT losses). The teacher is detached.

    Properties: ``W`` is a distance, so the value is ``>= 0``; when student and teacher give
    identical distributions the diagonal of ``W`` is 0 and the value is 0 up to the entropic
    blur ``~ exp(-W_ij / epsilon)`` of off-diagonal mass (small for well-separated samples and
    small ``epsilon``). The official code uses ``T = 2`` and a loss weight of ``0.0008`` (with a
    further ``20 / 8`` on GLUE): set both in the experiment. No ``T^2`` factor is applied.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations}")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    if student_rows.shape[0] == 0:
        per_row = as_float32(student_rows).sum(dim=-1) * 0.0
        return reduce_rows(per_row, mask, leading_shape, reduction)
    student_probs = F.softmax(as_float32(student_rows) / temperature, dim=-1)
    teacher_probs = F.softmax(as_float32(teacher_rows) / temperature, dim=-1).to(student_probs.dtype)
    cost = torch.cdist(student_probs, teacher_probs, p=1.0)
    if plan_gradient:
        plan = sinkhorn_plan(cost, epsilon=epsilon, iterations=int(iterations))
    else:
        with torch.no_grad():
            plan = sinkhorn_plan(cost.detach(), epsilon=epsilon, iterations=int(iterations))
    per_row = (plan * cost).sum(dim=1)
    return reduce_rows(per_row, mask, leading_shape, reduction)
