"""ND loss: push student features to the direction of the teacher's class mean, with a large norm.

Reference: Y. Wang, L. Cheng, M. Duan, Y. Wang, Z. Feng, S. Kong, "Improving Knowledge
Distillation via Regularizing Feature Norm and Direction", arXiv 2305.17007 (2023); official code
github.com/WangYZ1608/Knowledge-Distillation-via-ND (``DirectNormLoss``).

The teacher's class means of the embedding features (the penultimate features, before the
classifier) over the training set serve as the targets: ``c_k = mean_{i: y_i = k} t_i``, with
``t_i`` the teacher's *raw* (not normalised) features, as the official ``emb_fea_distribution.py``
computes them (teacher in eval mode, training set). With ``e_k = c_k / ||c_k||`` the unit class
direction, the loss of sample ``i`` is the official ``DirectNormLoss``::

    l_i = 1 - <s_i, e_{y_i}> / max(||s_i||, ||t_i||)

where ``s_i`` is the student's feature and ``t_i`` the teacher's feature of the same sample. It
does both things the paper asks for: while ``||s_i|| < ||t_i||`` the loss is
``1 - ||s_i|| cos(s_i, e) / ||t_i||``, which grows the student's norm (up to the teacher's) and
aligns the direction; beyond the teacher's norm it is ``1 - cos(s_i, e)``, direction only. It is
in ``[0, 2]`` and 0 exactly when ``s_i`` points along ``e_{y_i}`` with ``||s_i|| >= ||t_i||``. The
official code sums over the batch and divides by the batch size: ``batchmean``.

In the paper the student's feature may first pass through a projection to the teacher's dim;
here that projection is an adapter on the student's source, so the loss expects matching dims.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from distill.losses._common import as_float32, reduce_rows, valid_mask, valid_rows
from distill.registry import LOSSES

Collect = Callable[[list[str]], Mapping[str, torch.Tensor]]


def _feature_dim(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


@LOSSES.register(
    "nd",
    summary="ND loss: student features toward the teacher's class-mean direction with a large norm (Wang et al. 2023).",
)
class NDLoss(torch.nn.Module):
    """ND loss (Wang et al. 2023): ``1 - <s_i, e_{y_i}> / max(||s_i||, ||t_i||)`` per sample.

    Tensor inputs: ``student_features`` ``[B, ...]`` (flattened to ``[B, D]``), ``teacher_features``
    ``[B, ...]`` (same ``D``; its per-sample norm is the norm target, as in the official code) and
    ``labels`` ``[B]``. State: buffers ``class_means`` ``[num_classes, D]`` (the teacher's raw class
    means over the training set) and ``ready``; :meth:`setup` fills them once before training.
    Hyper-parameter: ``ignore_index`` (-100): samples with this label are masked (and skipped by
    :meth:`setup`). A class with no training sample has no direction: its samples get a constant 1
    (no gradient). See the module docstring for the equation.
    """

    class_means: torch.Tensor
    ready: torch.Tensor
    setup_arguments = ("teacher_features", "labels")
    """What :meth:`setup` collects; the engine resolves them through the term's ``inputs``."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shapes: Mapping[str, tuple[int, ...]],
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        shape = input_shapes.get("teacher_features", input_shapes.get("student_features"))
        if shape is None:
            raise ValueError("NDLoss needs the shape of teacher_features (or student_features) in input_shapes")
        student_shape = input_shapes.get("student_features")
        if student_shape is not None and _feature_dim(tuple(student_shape)) != _feature_dim(tuple(shape)):
            raise ValueError(
                f"NDLoss: student_features {tuple(student_shape)} and teacher_features {tuple(shape)} have different "
                "dims; put an adapter on the student's source that projects it to the teacher's dim "
                "(e.g. `student.features -> proj`)"
            )
        self.num_classes = int(num_classes)
        self.dim = _feature_dim(tuple(shape))
        self.ignore_index = int(ignore_index)
        self.register_buffer("class_means", torch.zeros(self.num_classes, self.dim))
        self.register_buffer("ready", torch.tensor(False))

    # -- setup ----------------------------------------------------------------------------------

    @torch.no_grad()
    def setup(self, collect: Collect) -> None:
        """Compute the teacher's class means from ``collect(["teacher_features", "labels"])``.

        ``collect`` returns those arguments' tensors over the whole training set: features
        ``[N, ...]`` and labels ``[N]``. Means are of the raw features, accumulated in float64.
        Sets ``ready``.
        """
        data = collect(["teacher_features", "labels"])
        features, labels = data["teacher_features"], data["labels"]
        if features.shape[:1] != labels.shape or labels.dim() != 1:
            raise ValueError(
                f"NDLoss.setup: teacher_features {tuple(features.shape)} and labels {tuple(labels.shape)} must be [N, ...] and [N]"
            )
        features = features.flatten(1)
        if features.shape[1] != self.dim:
            raise ValueError(f"NDLoss.setup: teacher_features have {features.shape[1]} dims, the loss was built for {self.dim}")
        labels = labels.to(features.device).long()
        keep = labels != self.ignore_index
        features, labels = features[keep], labels[keep]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"NDLoss.setup: labels must be in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}")
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=features.device)
        counts = torch.zeros(self.num_classes, dtype=torch.float64, device=features.device)
        sums.index_add_(0, labels, features.to(torch.float64))
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        self.class_means.copy_(means.to(self.class_means.device, self.class_means.dtype))
        self.ready.fill_(True)

    # -- the loss -------------------------------------------------------------------------------

    def directions(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit class directions ``e_k = c_k / ||c_k||`` ``[num_classes, D]`` (0 for a class never seen)."""
        means = self.class_means.to(dtype)
        norms = means.norm(dim=1, keepdim=True)
        return torch.where(norms > 0, means / norms.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(means))

    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        labels: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        if not bool(self.ready):
            raise RuntimeError(
                "NDLoss: the teacher's class means are not computed yet; call setup(collect) first "
                "(the training engine does this once before the stage)"
            )
        if student_features.dim() < 2 or teacher_features.shape[:1] != student_features.shape[:1]:
            raise ValueError(
                f"NDLoss: student_features {tuple(student_features.shape)} and teacher_features "
                f"{tuple(teacher_features.shape)} must be [B, ...] with the same B"
            )
        student_dim = _feature_dim(tuple(student_features.shape[1:]))
        if student_dim != self.dim or _feature_dim(tuple(teacher_features.shape[1:])) != self.dim:
            raise ValueError(
                f"NDLoss: student_features {tuple(student_features.shape)} / teacher_features "
                f"{tuple(teacher_features.shape)} must both have the teacher's feature dim {self.dim}; put an adapter "
                "on the student's source that projects it to the teacher's dim (e.g. `student.features -> proj`)"
            )
        leading_shape = student_features.shape[:1]
        if labels.shape != leading_shape:
            raise ValueError(f"NDLoss: labels have shape {tuple(labels.shape)}, expected {tuple(leading_shape)}")
        device = student_features.device
        mask = valid_mask(mask, leading_shape, device)
        labels = labels.to(device)
        label_valid = labels != self.ignore_index
        mask = label_valid if mask is None else (mask & label_valid)
        student_rows, teacher_rows, label_rows = valid_rows(
            mask, student_features, teacher_features.detach().to(device), labels, leading_dims=1
        )
        student_rows = as_float32(student_rows).flatten(1)
        teacher_rows = as_float32(teacher_rows).flatten(1).to(student_rows.dtype)
        label_rows = label_rows.long()
        if label_rows.numel() and (int(label_rows.min()) < 0 or int(label_rows.max()) >= self.num_classes):
            raise ValueError(f"NDLoss: labels must be in [0, {self.num_classes}) or ignore_index")
        direction = self.directions(student_rows.dtype).to(device)[label_rows]
        projection = (student_rows * direction).sum(dim=-1)
        scale = torch.maximum(student_rows.norm(dim=-1), teacher_rows.norm(dim=-1))
        per_row = 1.0 - projection / scale.clamp_min(torch.finfo(student_rows.dtype).tiny)
        return reduce_rows(per_row, mask, leading_shape, reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, ready={bool(self.ready)}"

