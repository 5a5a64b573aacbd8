"""QCRD: Quality-guided Contrastive Rationale Distillation.

Reference: W. Wang, Z. Li, Q. Xu, Y. Cai, H. Song, Q. Qi, R. Zhou, Z. Huang, T. Wang, L. Xiao,
"QCRD: Quality-guided Contrastive Rationale Distillation for Large Language Models", EMNLP 2025
(arXiv 2405.13014, 2024).

The method, as the paper describes it:

* **positive rationales**: the teacher LLM samples several rationales per question at temperature
  (0.7, five samples in the paper); those that agree with the self-consistent (majority) answer
  are kept. This is the data pipeline's job: they are the pairs' index 0.
* **negative rationales**: sampled at a high temperature (1.5 in the paper) from an *earlier*
  checkpoint of the student itself (five iterations before, in the paper): the self-adversarial
  negatives. :func:`distill.engine.rollout.sample_negatives` builds such pairs; they are index 1.
* **contrastive loss**: the student fits the positives and is pushed away from the negatives; the
  negative term is a hinge with margin ``delta`` (3 in the paper) on the negative's token-averaged
  cross-entropy, so a negative the student already finds unlikely enough stops contributing;
  weighted by ``beta`` (0.2 in the paper).
* **quality-guided weights**: an online-updated discriminator scores each rationale's quality
  ``s`` in (0, 1) (trained to tell positives, 1, from negatives, 0); a positive weighs more the
  higher its quality, a negative the lower its quality, so a student sample that has become good
  stops being pushed away.

Per pair of the batch (``nll(y) = -log pi(y|x) / |y|``, the token-averaged cross-entropy of the
trace, 0 for a trace without counted positions)::

    L = w+ * nll(y+)  +  negative_weight * w- * C(y+, y-)
    w+ = s(y+) if weight_positives else 1,     w- = 1 - s(y-)          (both detached)
    C  = max(margin - nll(y-), 0)                                       contrast="margin" (paper)
    C  = softplus(margin - (nll(y-) - nll(y+)))                         contrast="sigmoid"

``C`` is 0 for a pair whose negative has no counted position. The paper's contrastive loss is
"many-to-one" over several positives and negatives per question (the closest positive, the
hardest negative); with one positive and one negative per pair, as here, the min and max are
over a single element. Multi-task terms of the paper (the label-prediction loss) are separate
objective terms.

Data layout and reductions: those of :mod:`distill.losses.redi` (pairs ``[..., 2, T, V]``, index 0
positive, 1 negative; ``unit = "sequence"``: ``"sum"`` over pairs, ``"batchmean"`` the mean over
pairs, ``"none"`` one value per pair).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32
from distill.losses.redi import (
    NEGATIVE,
    POSITIVE,
    length_normalised,
    pair_log_likelihoods,
    reduce_sequences,
    sequence_unit,
)
from distill.registry import LOSSES

CONTRASTS: tuple[str, ...] = ("margin", "sigmoid")
POOLINGS: tuple[str, ...] = ("max", "mean")
DEFAULT_MARGINS: dict[str, float] = {"margin": 3.0, "sigmoid": 0.0}
"""``margin`` when it is left at None: the paper's ``delta = 3`` for the hinge; 0 for the logistic contrast."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got '{value}'")


def _resolve_margin(contrast: str, margin: float | None) -> float:
    _check_choice("contrast", contrast, CONTRASTS)
    value = DEFAULT_MARGINS[contrast] if margin is None else float(margin)
    if contrast == "margin" and not value > 0:
        raise ValueError(f"margin must be > 0 for contrast='margin' (the hinge max(margin - nll, 0)), got {value}")
    return value


def _check_quality(name: str, quality: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    if quality is None:
        return None
    if tuple(quality.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(quality.shape)}; expected one value per pair, {tuple(shape)}")
    return quality.detach()


def _contrast(
    positive_nll: torch.Tensor,
    negative_nll: torch.Tensor,
    negative_present: torch.Tensor,
    *,
    contrast: str,
    margin: float,
) -> torch.Tensor:
    if contrast == "margin":
        value = torch.clamp_min(margin - negative_nll, 0.0)
    else:
        value = F.softplus(margin - (negative_nll - positive_nll))
    return torch.where(negative_present, value, torch.zeros_like(value))


@sequence_unit
def qcrd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    positive_quality: torch.Tensor | None = None,
    negative_quality: torch.Tensor | None = None,
    *,
    contrast: str = "margin",
    margin: float | None = None,
    negative_weight: float = 0.2,
    weight_positives: bool = True,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """QCRD's quality-weighted contrastive loss for given quality scores (module docstring formula).

    ``positive_quality`` / ``negative_quality`` ``[...]`` (one value in [0, 1] per pair, detached
    here; None = no weighting, ``w = 1``) are the discriminator's scores ``s(y+)``, ``s(y-)``.
    :class:`QCRD` computes them with its own discriminator; this function is the loss alone.
    ``margin`` None takes 3.0 for ``contrast="margin"`` (the paper's ``delta``) and 0.0 for
    ``"sigmoid"``; ``negative_weight`` (0.2) is the paper's ``beta``.
    """
    margin_value = _resolve_margin(contrast, margin)
    if not negative_weight >= 0.0:
        raise ValueError(f"negative_weight must be >= 0, got {negative_weight}")
    log_likelihood, length, counted_pairs = pair_log_likelihoods(
        student_logits, labels, mask=mask, ignore_index=ignore_index
    )
    nll = -length_normalised(log_likelihood, length)
    pair_shape = counted_pairs.shape
    positive_quality = _check_quality("positive_quality", positive_quality, pair_shape)
    negative_quality = _check_quality("negative_quality", negative_quality, pair_shape)
    positive_nll, negative_nll = nll[..., POSITIVE], nll[..., NEGATIVE]
    contrast_value = _contrast(
        positive_nll, negative_nll, length[..., NEGATIVE] > 0, contrast=contrast, margin=margin_value
    )
    positive_w = (
        positive_quality.to(nll) if (weight_positives and positive_quality is not None) else torch.ones_like(nll[..., 0])
    )
    negative_w = 1.0 - negative_quality.to(nll) if negative_quality is not None else torch.ones_like(nll[..., 0])
    per_pair = positive_w * positive_nll + negative_weight * negative_w * contrast_value
    return reduce_sequences(per_pair, counted_pairs, reduction)


class RationaleDiscriminator(torch.nn.Module):
    """QCRD's rationale-quality discriminator on the student's final hidden states.

    The paper's discriminator is a T5-base encoder reading (question, rationale), max pooling, and
    two linear layers. Here the encoder is the student itself: the input is the student's final
    hidden states at the rationale's counted positions (each of which has read the question and the
    rationale so far, through causal attention), detached, so the discriminator does not move the
    student. Pooled over those positions (``"max"`` as the paper, or ``"mean"``), normalised by a
    parameter-free LayerNorm (hidden states of language models have a few very large
    coordinates), then ``Linear(H, hidden) -> GELU -> Linear(hidden, 1)``. The output layer starts
    at zero: an untrained discriminator scores every rationale 0.5.
    """

    def __init__(self, hidden_size: int, *, hidden: int = 128, pooling: str = "max") -> None:
        super().__init__()
        _check_choice("pooling", pooling, POOLINGS)
        if int(hidden_size) < 1 or int(hidden) < 1:
            raise ValueError(f"hidden_size and hidden must be >= 1, got {hidden_size} and {hidden}")
        self.pooling = pooling
        self.norm = torch.nn.LayerNorm(int(hidden_size), elementwise_affine=False)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(int(hidden_size), int(hidden)), torch.nn.GELU(), torch.nn.Linear(int(hidden), 1)
        )
        torch.nn.init.zeros_(self.head[-1].weight)
        torch.nn.init.zeros_(self.head[-1].bias)

    def pool(self, hidden_states: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """``[..., T, H]`` states and ``[..., T]`` counted positions -> ``[..., H]`` (0 for no position)."""
        states = as_float32(hidden_states.detach())
        present = counted.any(dim=-1, keepdim=True)
        if self.pooling == "max":
            filled = states.masked_fill(~counted.unsqueeze(-1), float("-inf"))
            pooled = filled.amax(dim=-2)
            return torch.where(present, pooled, torch.zeros_like(pooled))
        weights = counted.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(dim=-2) / weights.sum(dim=-2).clamp_min(1.0)

    def forward(self, hidden_states: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """Quality logits ``[...]`` of the sequences of ``hidden_states`` ``[..., T, H]``."""
        pooled = self.pool(hidden_states, counted)
        parameter = self.head[0].weight
        return self.head(self.norm(pooled.to(parameter.dtype))).squeeze(-1)


@sequence_unit
@LOSSES.register(
    "qcrd",
    summary="QCRD: contrastive rationale distillation with self-adversarial negatives and an online quality discriminator (Wang et al. 2024).",
)
class QCRD(torch.nn.Module):
    """Quality-guided Contrastive Rationale Distillation (Wang et al., EMNLP 2025) as an objective term.

    ``forward(student_logits, student_hidden, labels)`` on pairs ``[..., 2, T, V]`` /
    ``[..., 2, T, H]`` / ``[..., 2, T]`` (sources ``student.logits``, ``student.last_hidden``,
    ``batch.labels``; index 0 = positive rationale from the teacher, 1 = negative rationale from
    an earlier student): the loss of :func:`qcrd_loss` with the quality scores of the module's
    :class:`RationaleDiscriminator`, ``s = sigmoid(discriminator(y))``.

    **Online discriminator.** In the same call the discriminator is trained with binary
    cross-entropy, positives labelled 1 and negatives 0 (sequences without counted positions left
    out), weighted by ``discriminator_weight``. Its parameters belong to this module, so they are
    trained by the stage's optimizer with the student and checkpointed with the objective. The BCE
    is attached as ``bce - stopgrad(bce)``: it gives the discriminator its gradient without changing
    the returned value (the student's loss) and, since the discriminator reads detached hidden
    states, without reaching the student. The paper pre-trains its discriminator (500 steps on the
    teacher's rationales) and then updates it at regular intervals; here it learns from the first
    step, and ``warmup_steps`` keeps the weights at 1 for that many optimizer steps while it does
    (the paper's pre-training, done online). :meth:`update`, which the engine calls after every
    optimizer step, counts the steps.

    Constructor (keyword-only; ``input_shapes`` is supplied by the objective, the hidden size is
    read from ``input_shapes["student_hidden"]``, the shape of one sample ``(2, T, H)``):

    * ``contrast`` (``"margin"``, the paper's hinge) or ``"sigmoid"``; ``margin`` (None: 3.0 for
      the hinge, the paper's ``delta``; 0.0 for the logistic form);
    * ``negative_weight`` (0.2, the paper's ``beta``);
    * ``weight_positives`` (True: the positive's NLL is weighted by its quality, as in the paper;
      False weights the negatives only);
    * ``discriminator_hidden`` (128), ``pooling`` (``"max"``, the paper's pooling),
      ``discriminator_weight`` (1.0, the BCE's weight), ``warmup_steps`` (0);
    * ``ignore_index`` (-100).

    The paper multiplies its loss weights by 0.9 each iteration for one of its terms; a decaying
    weight is not offered here (a stage's term weights are constant). After each call,
    ``last_quality`` (``positive`` / ``negative``: mean scores) and ``last_losses`` (``nll``,
    ``contrast``, ``discriminator``: detached means over the counted pairs) hold what the call
    computed, for logs and tests.
    """

    steps: torch.Tensor

    def __init__(
        self,
        *,
        input_shapes: Mapping[str, tuple[int, ...]],
        contrast: str = "margin",
        margin: float | None = None,
        negative_weight: float = 0.2,
        weight_positives: bool = True,
        discriminator_hidden: int = 128,
        pooling: str = "max",
        discriminator_weight: float = 1.0,
        warmup_steps: int = 0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.margin = _resolve_margin(contrast, margin)
        _check_choice("pooling", pooling, POOLINGS)
        if not negative_weight >= 0.0 or not discriminator_weight >= 0.0:
            raise ValueError(
                f"negative_weight and discriminator_weight must be >= 0, got {negative_weight} and {discriminator_weight}"
            )
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        shape = tuple(input_shapes.get("student_hidden", ()))
        if len(shape) < 3 or shape[-3] != 2:
            raise ValueError(
                "QCRD reads student_hidden (source student.last_hidden) of pairs: input_shapes['student_hidden'] "
                f"must be the shape of one sample, (2, T, H); got {shape or 'nothing'}"
            )
        self.contrast = contrast
        self.negative_weight = float(negative_weight)
        self.weight_positives = bool(weight_positives)
        self.discriminator_weight = float(discriminator_weight)
        self.warmup_steps = int(warmup_steps)
        self.ignore_index = int(ignore_index)
        self.discriminator = RationaleDiscriminator(int(shape[-1]), hidden=int(discriminator_hidden), pooling=pooling)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last_quality: dict[str, torch.Tensor] = {}
        self.last_losses: dict[str, torch.Tensor] = {}

    def forward(
        self,
        student_logits: torch.Tensor,
        student_hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        if tuple(student_hidden.shape[:-1]) != tuple(student_logits.shape[:-1]):
            raise ValueError(
                f"student_hidden {tuple(student_hidden.shape)} must be [..., 2, T, H] with the leading dims of "
                f"student_logits {tuple(student_logits.shape)}"
            )
        log_likelihood, length, counted_pairs = pair_log_likelihoods(
            student_logits, labels, mask=mask, ignore_index=self.ignore_index
        )
        counted = labels.to(student_logits.device) != self.ignore_index
        if mask is not None:
            counted = counted & mask.to(device=counted.device, dtype=torch.bool)
        logits = self.discriminator(student_hidden, counted)  # [..., 2]
        quality = torch.sigmoid(logits.detach()).to(log_likelihood.dtype)
        in_warmup = int(self.steps) < self.warmup_steps
        nll = -length_normalised(log_likelihood, length)
        positive_nll, negative_nll = nll[..., POSITIVE], nll[..., NEGATIVE]
        negative_present = length[..., NEGATIVE] > 0
        contrast_value = _contrast(
            positive_nll, negative_nll, negative_present, contrast=self.contrast, margin=self.margin
        )
        ones = torch.ones_like(positive_nll)
        positive_w = quality[..., POSITIVE] if (self.weight_positives and not in_warmup) else ones
        negative_w = ones if in_warmup else 1.0 - quality[..., NEGATIVE]
        per_pair = positive_w * positive_nll + self.negative_weight * negative_w * contrast_value
        # the discriminator's BCE: positives 1, negatives 0, present sequences only
        present = length > 0
        targets = torch.zeros_like(logits)
        targets[..., POSITIVE] = 1.0
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        bce = torch.where(present, bce, torch.zeros_like(bce)).sum(dim=-1).to(per_pair.dtype)
        attached = per_pair + self.discriminator_weight * (bce - bce.detach())
        self._record(counted_pairs, positive_nll, contrast_value, bce, quality, present)
        return reduce_sequences(attached, counted_pairs, reduction)

    @torch.no_grad()
    def _record(
        self,
        counted_pairs: torch.Tensor,
        positive_nll: torch.Tensor,
        contrast_value: torch.Tensor,
        bce: torch.Tensor,
        quality: torch.Tensor,
        present: torch.Tensor,
    ) -> None:
        pairs = max(int(counted_pairs.sum()), 1)

        def mean_over(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            return values.detach()[where].sum() / max(int(where.sum()), 1)

        self.last_losses = {
            "nll": positive_nll.detach()[counted_pairs].sum() / pairs,
            "contrast": contrast_value.detach()[counted_pairs].sum() / pairs,
            "discriminator": bce.detach()[counted_pairs].sum() / pairs,
        }
        self.last_quality = {
            "positive": mean_over(quality[..., POSITIVE], present[..., POSITIVE]),
            "negative": mean_over(quality[..., NEGATIVE], present[..., NEGATIVE]),
        }

    @torch.no_grad()
    def quality(self, student_hidden: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The discriminator's quality scores ``s`` in (0, 1) of every sequence ``[..., T]`` -> ``[...]``."""
        counted = labels.to(student_hidden.device) != self.ignore_index
        if mask is not None:
            counted = counted & mask.to(device=counted.device, dtype=torch.bool)
        return torch.sigmoid(self.discriminator(student_hidden, counted))

    @torch.no_grad()
    def update(self, *, step: int, total_steps: int, value: float) -> None:
        """After optimizer step ``step``: record it (ends the weight warm-up after ``warmup_steps``)."""
        self.steps.fill_(int(step))

    def extra_repr(self) -> str:
        return (
            f"contrast='{self.contrast}', margin={self.margin}, negative_weight={self.negative_weight}, "
            f"weight_positives={self.weight_positives}, discriminator_weight={self.discriminator_weight}, "
            f"warmup_steps={self.warmup_steps}, steps={int(self.steps)}"
        )
