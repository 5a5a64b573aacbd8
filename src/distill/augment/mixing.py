"""Mixup and CutMix for distillation, with partial mixing, and the label loss of mixed samples.

References:

* H. Zhang, M. Cisse, Y. Dauphin, D. Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
* S. Yun, D. Han, S. J. Oh, S. Chun, J. Choe, Y. Yoo, "CutMix: Regularization Strategy to Train Strong
  Classifiers with Localizable Features", ICCV 2019.
* H. Choi, E. S. Jeon, A. Shukla, P. Turaga, "Understanding the Role of Mixup in Knowledge Distillation:
  An Empirical Study", WACV 2023 (code: github.com/hchoi71/MIX-KD). Their *partial mixup* (PMU) mixes
  only a share of each batch and keeps the rest as is; for distillation their code's default mixes
  10% of the batch (``--partmixup 0.90``: "0.9 = 10%") with per-sample ``lambda ~ Beta(1, 1)``
  (``--beta_a 1.0``). That is the ``kd`` preset here: ``alpha=1.0, fraction=0.1``.

Teacher and student must see the *same* mixed batch: :func:`mix_batch` returns one tensor,
``MixedBatch.inputs``, that replaces the batch's inputs before the forward pass of both models.

Randomness comes from the global torch RNG (checkpointed by the engine, so a resumed run draws the
same mixes) or from ``generator`` when one is given. Every draw is made on the CPU and moved to the
inputs' device, so the same RNG state gives the same mix on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32, check_logits, reduce_rows, valid_mask, valid_rows
from distill.registry import LOSSES

METHODS: tuple[str, ...] = ("mixup", "cutmix")

MIXING_PRESETS: dict[str, dict[str, Any]] = {
    # Choi et al. (WACV 2023), MIX-KD code defaults for distillation: partial mixup of 10% of
    # each batch, lambda ~ Beta(1, 1) per sample.
    "kd": {"method": "mixup", "alpha": 1.0, "fraction": 0.1},
    # Ordinary full-batch mixup / CutMix (Zhang et al. 2018; Yun et al. 2019 use alpha = 1 for CutMix).
    "mixup": {"method": "mixup", "alpha": 1.0, "fraction": 1.0},
    "cutmix": {"method": "cutmix", "alpha": 1.0, "fraction": 1.0},
}
"""Named settings for :func:`mix_batch`: ``mix_batch(x, y, **MIXING_PRESETS["kd"])``."""


@dataclass
class MixedBatch:
    """A mixed batch. Row ``i`` of ``inputs`` is ``lam[i] * x[i] + (1 - lam[i]) * x[partner[i]]`` (mixup)
    or ``x[i]`` with a box pasted from ``x[partner[i]]`` covering ``1 - lam[i]`` of the image (CutMix).

    ``labels_a`` are the original labels, ``labels_b`` the partners' labels, ``lam`` float32 ``[B]`` the
    weight of ``labels_a``; rows that were not mixed (``mixed[i]`` False) have ``lam = 1``,
    ``labels_b = labels_a`` and their input unchanged.
    """

    inputs: torch.Tensor
    labels_a: torch.Tensor
    labels_b: torch.Tensor
    lam: torch.Tensor
    mixed: torch.Tensor
    partner: torch.Tensor

    def sources(self) -> dict[str, torch.Tensor]:
        """The objective sources of this batch: ``batch.inputs``, ``batch.labels`` (= ``labels_a``),
        ``batch.labels_b``, ``batch.mix_lam`` and ``batch.mixed``."""
        return {
            "batch.inputs": self.inputs,
            "batch.labels": self.labels_a,
            "batch.labels_b": self.labels_b,
            "batch.mix_lam": self.lam,
            "batch.mixed": self.mixed,
        }


def sample_beta(alpha: float, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """float64 ``[size]`` draws of ``Beta(alpha, alpha)`` on the CPU, from ``generator`` or the global RNG.

    ``Beta(a, a) = G1 / (G1 + G2)`` with ``G1, G2 ~ Gamma(a)``. For tiny ``alpha`` both gammas can
    underflow to 0; such a draw is replaced by 0 or 1 with equal chance (the limit distribution).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    concentration = torch.full((2, size), float(alpha), dtype=torch.float64)
    gammas = torch._standard_gamma(concentration, generator=generator)
    total = gammas.sum(dim=0)
    coin = (torch.rand(size, dtype=torch.float64, generator=generator) < 0.5).to(torch.float64)
    return torch.where(total > 0, gammas[0] / total.clamp_min(torch.finfo(torch.float64).tiny), coin)


def mix_batch(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str = "mixup",
    alpha: float = 1.0,
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Mix ``round(fraction * B)`` rows of a batch with random partners (mixup or CutMix).

    ``inputs`` is float ``[B, ...]`` (``[B, C, H, W]`` for CutMix), ``labels`` ``[B, ...]``. Each
    mixed row gets its own ``lam ~ Beta(alpha, alpha)`` and a partner drawn by a random permutation
    of the batch. With ``fraction < 1`` (partial mixup, Choi et al. 2023) exactly
    ``round(fraction * B)`` rows, chosen at random, are mixed and the others are left as they are.

    * ``mixup``: ``x = lam * x_a + (1 - lam) * x_b``.
    * ``cutmix``: a box of side ``sqrt(1 - lam)`` times the image's, centred uniformly and clipped at
      the border, is pasted from ``x_b``; ``lam`` is then recomputed from the box's actual area,
      ``1 - box_area / (H * W)`` (as in the CutMix paper's code).

    Draws, in order: the rows to mix, the partners, ``lam`` (and for CutMix the box centres), all
    from ``generator`` or the global torch RNG, on the CPU. Returns a :class:`MixedBatch`; its
    ``inputs`` is the one tensor that teacher and student both consume.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if inputs.dim() < 1 or not inputs.is_floating_point():
        raise ValueError(f"mix_batch needs floating-point inputs [B, ...]; got {inputs.dtype} {tuple(inputs.shape)}")
    batch = inputs.shape[0]
    if labels.shape[:1] != (batch,):
        raise ValueError(f"labels {tuple(labels.shape)} must have one row per input: inputs {tuple(inputs.shape)}")
    if method == "cutmix" and inputs.dim() != 4:
        raise ValueError(f"cutmix needs image batches [B, C, H, W]; got inputs of shape {tuple(inputs.shape)}")
    device = inputs.device

    count = round(fraction * batch)
    chosen = torch.randperm(batch, generator=generator)[:count]
    mixed = torch.zeros(batch, dtype=torch.bool)
    mixed[chosen] = True
    partner = torch.randperm(batch, generator=generator)
    lam = sample_beta(alpha, batch, generator)

    if method == "mixup":
        weights = lam.to(device=device, dtype=inputs.dtype).reshape(batch, *([1] * (inputs.dim() - 1)))
        blended = weights * inputs + (1.0 - weights) * inputs[partner.to(device)]
    else:
        height, width = inputs.shape[-2:]
        box = _cutmix_boxes(lam, height, width, generator)
        rows = torch.arange(height)[None, :]
        cols = torch.arange(width)[None, :]
        inside_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # [B, H]
        inside_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # [B, W]
        pasted = (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None].to(device)  # [B, 1, H, W]
        blended = torch.where(pasted, inputs[partner.to(device)], inputs)
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        lam = 1.0 - area.to(torch.float64) / float(height * width)

    lam = torch.where(mixed, lam, torch.ones_like(lam))
    mixed_device = mixed.to(device)
    shape = (batch, *([1] * (inputs.dim() - 1)))
    out = torch.where(mixed_device.reshape(shape), blended, inputs)
    labels_b = torch.where(
        mixed.to(labels.device).reshape(batch, *([1] * (labels.dim() - 1))), labels[partner.to(labels.device)], labels
    )
    return MixedBatch(
        inputs=out,
        labels_a=labels,
        labels_b=labels_b,
        lam=lam.to(device=device, dtype=torch.float32),
        mixed=mixed_device,
        partner=partner.to(device),
    )


def _cutmix_boxes(lam: torch.Tensor, height: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """int64 ``[B, 4]`` boxes ``(top, bottom, left, right)`` (bottom/right exclusive), one per ``lam``."""
    ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * ratio).floor().to(torch.int64)
    cut_w = (width * ratio).floor().to(torch.int64)
    centres = torch.rand(lam.shape[0], 2, dtype=torch.float64, generator=generator)
    cy = (centres[:, 0] * height).floor().to(torch.int64).clamp(max=height - 1)
    cx = (centres[:, 1] * width).floor().to(torch.int64).clamp(max=width - 1)
    top = (cy - cut_h // 2).clamp(0, height)
    bottom = (cy + cut_h // 2).clamp(0, height)
    left = (cx - cut_w // 2).clamp(0, width)
    right = (cx + cut_w // 2).clamp(0, width)
    return torch.stack([top, bottom, left, right], dim=1)


@LOSSES.register(
    "mixed_cross_entropy",
    summary="Cross-entropy of mixed samples: lam * CE(y_a) + (1 - lam) * CE(y_b) (mixup, CutMix).",
)
def mixed_cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    labels_b: torch.Tensor,
    mix_lam: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """The label loss of a mixed batch (Zhang et al. 2018, eq. 1; Yun et al. 2019, eq. 1).

    ``lam * CE(z, y_a) + (1 - lam) * CE(z, y_b)`` per position, where ``z`` are the student's
    logits ``[..., C]``, ``labels`` (``y_a``) and ``labels_b`` (``y_b``) integer ``[...]`` and
    ``mix_lam`` the weight of ``y_a``, ``[...]`` (from :func:`mix_batch`: sources ``batch.labels``,
    ``batch.labels_b``, ``batch.mix_lam``). Unmixed rows (``lam = 1``, ``y_b = y_a``) give plain
    cross-entropy. Computed in float32; ``mask`` and ``reduction`` as in
    :mod:`distill.losses._common`.
    """
    check_logits(student_logits)
    leading_shape = student_logits.shape[:-1]
    device = student_logits.device
    for name, tensor in (("labels", labels), ("labels_b", labels_b)):
        if tensor.shape != leading_shape:
            raise ValueError(
                f"{name} have shape {tuple(tensor.shape)} but student_logits' leading dims are {tuple(leading_shape)}"
            )
    if mix_lam.dim() == 0:
        mix_lam = mix_lam.expand(leading_shape)
    if mix_lam.shape != leading_shape:
        raise ValueError(f"mix_lam has shape {tuple(mix_lam.shape)}; expected {tuple(leading_shape)} or a scalar")
    mask = valid_mask(mask, leading_shape, device)
    student_rows, label_rows, label_b_rows, lam_rows = valid_rows(
        mask, student_logits, labels.to(device), labels_b.to(device), mix_lam.to(device), leading_dims=len(leading_shape)
    )
    log_probs = F.log_softmax(as_float32(student_rows), dim=-1)
    nll_a = -log_probs.gather(-1, label_rows.long().unsqueeze(-1)).squeeze(-1)
    nll_b = -log_probs.gather(-1, label_b_rows.long().unsqueeze(-1)).squeeze(-1)
    lam = lam_rows.detach().to(log_probs.dtype)
    per_row = lam * nll_a + (1.0 - lam) * nll_b
    return reduce_rows(per_row, mask, leading_shape, reduction)
