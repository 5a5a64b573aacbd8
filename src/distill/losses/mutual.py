"""Online (mutual) distillation: a cohort of networks trained together, each learning from the others.

References:

* Y. Zhang, T. Xiang, T. M. Hospedales, H. Lu, "Deep Mutual Learning", CVPR 2018 (DML).
* I. Amara, N. Sepahvand, B. H. Meyer, W. J. Gross, J. J. Clark, "BD-KD: Balancing the Divergences
  for Online Knowledge Distillation", arXiv 2212.12965: in online distillation, the compact
  network's distillation loss balances the forward and reverse KL per sample by the entropies
  (:func:`distill.losses.bdkd.bdkd`), while the large network keeps the usual KL.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32, kl_rows, reduce_rows, valid_mask, valid_rows
from distill.losses.bdkd import balance_weights, entropy
from distill.registry import LOSSES


@LOSSES.register(
    "mutual_kd",
    summary="Deep Mutual Learning over a cohort [B, N, C]: each network's CE + KL from its peers; BD-KD balancing optional.",
)
def mutual_kd(
    cohort_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    label_weight: float = 1.0,
    peer_weight: float = 1.0,
    balanced: Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Sum over the cohort's networks of their DML losses, per sample.

    For network ``i`` of ``N`` with logits ``z_i`` (``cohort_logits[:, i]``, the stage's ``model``
    first), ``p_i = softmax(z_i / T)``::

        L_i = label_weight * CE(z_i, y) + peer_weight * T^2 / (N - 1) * sum_{j != i} D(p_j || p_i)

    where the peer ``p_j`` is detached (each network is the others' teacher, and learns only from
    its own term), so one backward pass of ``sum_i L_i`` gives every network exactly the gradient
    of its own DML loss: all networks update in the same step, the simultaneous variant of
    DML (the paper alternates the updates within an iteration; with detached peers both give the
    same gradients for the first network, and the second sees the first's pre-update predictions).
    ``D`` is the forward KL ``KL(p_j || p_i)`` (DML's equation 2 with ``1 / (N - 1)``, eq. 10), or,
    for the networks listed in ``balanced`` (cohort positions; BD-KD's compact students), BD-KD's
    entropy-balanced ``w_fwd KL(p_j || p_i) + w_rev KL(p_i || p_j)`` with
    ``w_rev = H_i / (H_i + H_j)`` computed without gradient, as in :func:`distill.losses.bdkd.bdkd`.
    ``label_weight: 0`` drops the label term (labels are still read, and ignored). Float32; ``mask`` covers ``[B]``.
    """
    if cohort_logits.dim() != 3 or cohort_logits.shape[1] < 2:
        raise ValueError(f"cohort_logits must be [B, N, C] with N >= 2 networks; got {tuple(cohort_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    members = cohort_logits.shape[1]
    balanced_set = set(int(i) for i in (balanced or ()))
    bad = sorted(i for i in balanced_set if not 0 <= i < members)
    if bad:
        raise ValueError(f"balanced lists cohort positions {bad}, but the cohort has {members} networks (0..{members - 1})")
    leading_shape = cohort_logits.shape[:1]
    mask = valid_mask(mask, leading_shape, cohort_logits.device)
    rows = valid_rows(mask, cohort_logits, labels.to(cohort_logits.device), leading_dims=1)
    logits = as_float32(rows[0])
    log_probs = F.log_softmax(logits / temperature, dim=-1)  # [P, N, C]
    detached = log_probs.detach()
    per_row = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for i in range(members):
        if label_weight:
            per_row = per_row + label_weight * F.cross_entropy(logits[:, i], rows[1].long(), reduction="none")
        peers = torch.zeros_like(per_row)
        for j in range(members):
            if j == i:
                continue
            forward = kl_rows(detached[:, j], log_probs[:, i])
            if i in balanced_set:
                reverse = kl_rows(log_probs[:, i], detached[:, j])
                w_forward, w_reverse = balance_weights(entropy(detached[:, i]), entropy(detached[:, j]))
                peers = peers + w_forward * forward + w_reverse * reverse
            else:
                peers = peers + forward
        per_row = per_row + peer_weight * temperature**2 * peers / (members - 1)
    return reduce_rows(per_row, mask, leading_shape, reduction)
