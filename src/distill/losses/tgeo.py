"""TGeo-KD: a learned, sample-wise fusion ratio between distillation and label losses.

Reference: C. Hu, H. Wu, X. Li, C. Ma, X. Chen, J. Yan, B. Wang, X. Liu, "Less or More From
Teacher: Exploiting Trilateral Geometry For Knowledge Distillation", ICLR 2024 (arXiv 2312.15112).

Knowledge distillation mixes the loss with the teacher and the loss with the labels by a fusion
ratio; TGeo-KD learns one ratio per sample, ``alpha_i in (0, 1)``, from the geometry of three
points in the probability simplex: the student's prediction ``S_i``, the teacher's ``T_i`` and the
ground truth ``G_i`` (one-hot), the *intra-sample* relations, plus the teacher's average
prediction over the samples of the sample's class, ``T̄_{y_i}`` (*inter-sample* relations, which
damp the influence of outliers). A small network ``f_omega`` maps the relations to ``alpha_i``::

    L_i = alpha_i * KD_i + (1 - alpha_i) * CE_i,      alpha_i = sigmoid(f_omega(Delta_i))
    KD_i = T^2 KL(softmax(z_t,i / T) || softmax(z_s,i / T)),   CE_i = -log softmax(z_s,i)_{y_i}

and ``omega`` is learned "in a bilevel-optimization manner" (abstract): the student minimizes the
fused training loss (inner problem), ``omega`` the student's label loss on held-out data after the
student's update (outer problem), the way sample re-weighting is learned in L2RW (Ren et al.,
ICML 2018) and Meta-Weight-Net (Shu et al., NeurIPS 2019).

What the abstract fixes: the inputs (S, T, G and T̄, intra- and inter-sample relations), a simple
network, a per-sample ratio, bilevel training. The precise encoding of the relations, the network
and the outer step below are this implementation's choices (the full text and code were not at
hand when it was written); each is configurable:

* **Relations** ``Delta_i`` (``inter_sample=True``): the edge vectors of the points, on
  probabilities at temperature 1 and detached: ``S-T, S-G, T-G`` (intra) and ``S-T̄, T-T̄, G-T̄``
  (inter), concatenated: ``6 C`` inputs (``3 C`` with ``inter_sample=False``).
* **Class-average teacher** ``T̄_c``: running mean of the teacher's probabilities over the training
  samples of class ``c`` seen so far (buffers ``class_sum``/``class_count``, updated in training
  mode; with a fixed teacher it is the exact training-set class mean after one epoch). A class not
  seen yet uses the sample's own ``T_i``.
* **Ratio network** ``f_omega``: ``Linear(k C, hidden) -> ReLU -> Linear(hidden, 1)``, output
  layer zero-initialised with bias ``logit(init_ratio)``, so training starts from the constant
  ratio ``init_ratio`` (0.5).
* **Inner problem**: the student gets ``sum_i alpha_i KD_i + (1 - alpha_i) CE_i`` with ``alpha_i``
  detached (the ratio is an input of the student's loss, as in Meta-Weight-Net), so the fused loss
  cannot train ``omega`` towards the trivially smaller loss.
* **Outer problem** (``ratio_training="lookahead"``): run inside the one training loop, without a
  validation loader. Each batch's valid positions are split, for the lookahead only: the last
  ``ceil(meta_fraction * P)`` serve as the meta set ``B``, the others ``A`` as the lookahead's
  inner batch. ``B`` is held out from the lookahead step, not from training: the student's own
  fused loss still covers every valid position, ``B`` included, in the same step. The student's
  update is approximated by one SGD step of size ``meta_lr`` on its last linear layer (weights and
  bias), which moves held-out logits by::

      Delta z_j = -(meta_lr / |A|) sum_{i in A} g_i (h_i . h_j + 1),
      g_i = alpha_i dKD_i/dz_i + (1 - alpha_i) dCE_i/dz_i = alpha_i T (q_i^T - p_i^T) + (1 - alpha_i)(q_i - G_i)

  (``h`` the penultimate features, ``student_features``); ``omega`` gets the gradient of
  ``mean_{j in B} CE(z_j + Delta z_j, y_j)``. This is the one-step-lookahead meta-gradient
  restricted to the classifier layer and computed in closed form from the features, so it needs no
  access to the student's parameters. The outer term is attached as ``outer - stopgrad(outer)`` to
  every valid position (so ``batchmean`` carries it once): it changes no value and no student
  gradient, only ``omega``'s. ``meta_lr`` plays the student's learning rate in the lookahead; the
  step also scales with ``|h|^2``, so lower it for large, unnormalised features. With
  ``ratio_training="none"`` ``omega`` is not trained (a fixed ratio network, e.g. for ablations).

The value is always ``sum/mean_i alpha_i KD_i + (1 - alpha_i) CE_i``; positions whose label is
``ignore_index`` count as masked; computed in float32 (float64 kept); ``mask``/``reduction`` as in
:mod:`distill.losses._common`. In multi-process training each process keeps its own class means
(from its shard); only the main process's are checkpointed.
"""

from __future__ import annotations

import math

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

RATIO_TRAINING: tuple[str, ...] = ("lookahead", "none")


def fused_kd_ce_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    label_rows: torch.Tensor,
    alpha: torch.Tensor | float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``alpha KD + (1 - alpha) CE``, ``KD``, ``CE``) per row for rows ``[P, C]``, labels ``[P]``."""
    student_log_probs = F.log_softmax(student_rows / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_rows / temperature, dim=-1)
    kd = kl_per_position(teacher_log_probs, student_log_probs) * (temperature**2)
    ce = -F.log_softmax(student_rows, dim=-1).gather(-1, label_rows.long().unsqueeze(-1)).squeeze(-1)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


@LOSSES.register(
    "tgeo_kd",
    summary="TGeo-KD: per-sample learned ratio alpha*KD + (1-alpha)*CE from student/teacher/label geometry (Hu et al. 2024).",
)
class TGeoKD(torch.nn.Module):
    """TGeo-KD (Hu et al., ICLR 2024): ``alpha_i KD_i + (1 - alpha_i) CE_i`` with a learned ``alpha_i``.

    Tensor inputs: ``student_logits`` ``[..., C]``, ``teacher_logits`` ``[..., C]``, ``labels``
    ``[...]``, ``student_features`` ``[..., D]`` (penultimate features, for the lookahead of the
    ratio network's training). Hyper-parameters: ``temperature`` of the KD part (4.0), ``hidden``
    width of the ratio network (64), ``inter_sample`` (use the class-average teacher, True),
    ``init_ratio`` (0.5), ``ratio_training`` (``"lookahead"`` or ``"none"``), ``meta_fraction``
    (share of each batch held out for the outer loss, 0.25), ``meta_lr`` (step size of the
    lookahead, 0.1), ``ignore_index`` (-100). See the module docstring for the equations.
    """

    class_sum: torch.Tensor
    class_count: torch.Tensor

    def __init__(
        self,
        *,
        num_classes: int,
        temperature: float = 4.0,
        hidden: int = 64,
        inter_sample: bool = True,
        init_ratio: float = 0.5,
        ratio_training: str = "lookahead",
        meta_fraction: float = 0.25,
        meta_lr: float = 0.1,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 < init_ratio < 1.0:
            raise ValueError(f"init_ratio must be in (0, 1), got {init_ratio}")
        if ratio_training not in RATIO_TRAINING:
            raise ValueError(f"ratio_training must be one of {RATIO_TRAINING}, got '{ratio_training}'")
        if not 0.0 < meta_fraction < 1.0:
            raise ValueError(f"meta_fraction must be in (0, 1), got {meta_fraction}")
        if not meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.inter_sample = bool(inter_sample)
        self.ratio_training = ratio_training
        self.meta_fraction = float(meta_fraction)
        self.meta_lr = float(meta_lr)
        self.ignore_index = int(ignore_index)
        relations = 6 if self.inter_sample else 3
        self.ratio_net = torch.nn.Sequential(
            torch.nn.Linear(relations * self.num_classes, int(hidden)),
            torch.nn.ReLU(),
            torch.nn.Linear(int(hidden), 1),
        )
        output = self.ratio_net[-1]
        assert isinstance(output, torch.nn.Linear)
        torch.nn.init.zeros_(output.weight)
        torch.nn.init.constant_(output.bias, math.log(init_ratio / (1.0 - init_ratio)))
        self.register_buffer("class_sum", torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(self.num_classes, dtype=torch.float64))

    # -- the ratio ------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_teacher(self, teacher_probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.class_sum.index_add_(0, labels, teacher_probs.to(self.class_sum.dtype))
        self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.class_count.dtype))

    def class_average(self, teacher_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``T̄_{y_i}`` for rows: the running class mean, or ``T_i`` for a class not seen yet."""
        count = self.class_count[labels].unsqueeze(-1)
        mean = (self.class_sum[labels] / count.clamp_min(1.0)).to(teacher_probs.dtype)
        return torch.where(count > 0, mean, teacher_probs)

    def relations(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        """The ratio network's input ``Delta_i`` for rows (detached): edges of S, T, G (and T̄)."""
        student = F.softmax(student_rows.detach(), dim=-1)
        teacher = F.softmax(teacher_rows.detach(), dim=-1)
        truth = F.one_hot(label_rows.long(), self.num_classes).to(student.dtype)
        edges = [student - teacher, student - truth, teacher - truth]
        if self.inter_sample:
            average = self.class_average(teacher, label_rows.long())
            edges += [student - average, teacher - average, truth - average]
        return torch.cat(edges, dim=-1)

    def ratio_rows(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
        """``alpha_i = sigmoid(f_omega(Delta_i))`` for rows ``[P, C]`` -> ``[P]`` (differentiable in ``omega``)."""
        relations = self.relations(student_rows, teacher_rows, label_rows)
        dtype = next(self.ratio_net.parameters()).dtype
        return torch.sigmoid(self.ratio_net(relations.to(dtype))).squeeze(-1).to(relations.dtype)

    def ratio(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """The fusion ratio ``alpha`` ``[...]`` for logits ``[..., C]`` and labels ``[...]`` (no state change).

        Positions whose label is ``ignore_index`` have no ratio: they get ``nan``.
        """
        check_logits(student_logits, teacher_logits)
        leading = student_logits.shape[:-1]
        student_rows = as_float32(student_logits.reshape(-1, self.num_classes))
        teacher_rows = as_float32(teacher_logits.reshape(-1, self.num_classes)).to(student_rows.dtype)
        label_rows = labels.reshape(-1).to(student_rows.device)
        valid = label_rows != self.ignore_index
        alpha = student_rows.new_full(label_rows.shape, float("nan"))
        if bool(valid.any()):
            alpha[valid] = self.ratio_rows(student_rows[valid], teacher_rows[valid], label_rows[valid])
        return alpha.reshape(leading)

    # -- the outer (meta) objective -------------------------------------------------------------

    def lookahead_loss(
        self,
        student_rows: torch.Tensor,
        teacher_rows: torch.Tensor,
        label_rows: torch.Tensor,
        feature_rows: torch.Tensor,
        alpha: torch.Tensor,
    ) -> torch.Tensor:
        """Held-out CE after a one-step lookahead of the student's last layer (see the module docstring).

        Rows ``[P, C]``, labels ``[P]``, features ``[P, D]``, ``alpha`` ``[P]`` (with its graph).
        Only ``alpha`` carries gradient. Needs ``P >= 2``.
        """
        rows = student_rows.shape[0]
        held_out = min(max(1, math.ceil(self.meta_fraction * rows)), rows - 1)
        inner = rows - held_out
        temperature = self.temperature
        with torch.no_grad():
            student = student_rows.detach()
            truth = F.one_hot(label_rows.long(), self.num_classes).to(student.dtype)
            grad_ce = F.softmax(student, dim=-1) - truth
            grad_kd = temperature * (F.softmax(student / temperature, dim=-1) - F.softmax(teacher_rows / temperature, dim=-1))
            features = feature_rows.detach().to(student.dtype)
            kernel = features[:inner] @ features[inner:].transpose(0, 1) + 1.0  # [|A|, |B|]
        weight = alpha[:inner].unsqueeze(-1).to(student.dtype)
        grad = grad_ce[:inner] + weight * (grad_kd[:inner] - grad_ce[:inner])  # [|A|, C]
        moved = student[inner:] - (self.meta_lr / inner) * (kernel.transpose(0, 1) @ grad)
        return F.cross_entropy(moved, label_rows[inner:].long())

    # -- the loss -------------------------------------------------------------------------------

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        student_features: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        check_logits(student_logits, teacher_logits)
        if student_logits.shape[-1] != self.num_classes:
            raise ValueError(f"the logits have {student_logits.shape[-1]} classes, TGeoKD was built for {self.num_classes}")
        leading_shape = student_logits.shape[:-1]
        if labels.shape != leading_shape:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the logits' leading dims are {tuple(leading_shape)}"
            )
        if student_features.shape[:-1] != leading_shape:
            raise ValueError(
                f"student_features {tuple(student_features.shape)} must have the logits' leading dims {tuple(leading_shape)}"
            )
        device = student_logits.device
        mask = valid_mask(mask, leading_shape, device)
        labels = labels.to(device)
        label_valid = labels != self.ignore_index
        mask = label_valid if mask is None else (mask & label_valid)
        student_rows, teacher_rows, label_rows, feature_rows = valid_rows(
            mask, student_logits, teacher_logits.detach(), labels, student_features, leading_dims=len(leading_shape)
        )
        student_rows = as_float32(student_rows)
        teacher_rows = as_float32(teacher_rows).to(student_rows.dtype)
        label_rows = label_rows.long()
        if self.training and self.inter_sample:
            self._record_teacher(F.softmax(teacher_rows, dim=-1), label_rows)
        alpha = self.ratio_rows(student_rows, teacher_rows, label_rows)
        per_row, _, _ = fused_kd_ce_rows(student_rows, teacher_rows, label_rows, alpha.detach(), self.temperature)
        rows = per_row.shape[0]
        if self.ratio_training == "lookahead" and self.training and torch.is_grad_enabled() and rows >= 2:
            outer = self.lookahead_loss(student_rows, teacher_rows, label_rows, feature_rows, alpha)
            per_row = per_row + (outer - outer.detach())
        return reduce_rows(per_row, mask, leading_shape, reduction)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, temperature={self.temperature}, inter_sample={self.inter_sample}, "
            f"ratio_training='{self.ratio_training}', meta_fraction={self.meta_fraction}, meta_lr={self.meta_lr}"
        )
