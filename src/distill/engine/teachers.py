"""Several teachers in one stage, and several students trained together (online distillation).

:class:`TeacherEnsemble` holds the frozen teachers of a multi-teacher stage. It runs them one
after another on a batch (with ``offload``, each is moved to the device only for its own pass,
so teachers that do not fit in memory together still run), and provides

* ``teachers.logits`` ``[B, K, C]``: teacher k's logits divided by its own temperature;
* ``teachers.weights`` ``[B, K]``: the configured weights, normalized, repeated over the batch;
* ``teacher.logits`` ``[B, C]``: the ensemble as log-probabilities, from
  :func:`distill.losses.multi_teacher.combine_teachers` (fixed weights, or per-sample weights
  from each teacher's confidence). Any loss that reads ``teacher.logits`` distils the ensemble.

Called like a model (``ensemble(x)``) it returns the ensemble's log-probabilities, so evaluation,
agreement and the other teacher-reading parts of the engine work unchanged. Without labels (at
evaluation) a label-confidence ensemble falls back to its fixed weights.

:class:`Cohort` is the trained "model" of an online stage: ``members[0]`` is the stage's
``model`` and the others are its ``cohort``. Its forward returns every member's logits
``[B, N, C]``; the engine reads ``student.logits`` from member 0 and ``cohort.logits`` from all.
One optimizer, one checkpoint and one DDP wrapper cover all members.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class TeacherEnsemble(nn.Module):
    """Frozen teachers combined into one ``teacher.logits``; see the module docstring."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        *,
        names: Sequence[str],
        weights: Sequence[float],
        temperatures: Sequence[float],
        method: str = "mean",
        confidence: str = "label",
        confidence_temperature: float = 1.0,
        offload: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if not (len(teachers) == len(names) == len(weights) == len(temperatures)) or len(teachers) < 2:
            raise ValueError("a teacher ensemble needs two or more teachers, each with a name, a weight and a temperature")
        self.teachers = nn.ModuleList(teachers)
        self.names = list(names)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32), persistent=False)
        self.temperatures = [float(t) for t in temperatures]
        self.method, self.confidence, self.confidence_temperature = method, confidence, float(confidence_temperature)
        self.offload = offload
        self.device = torch.device(device)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def for_stage(
        cls, stage: Any, models: Sequence[nn.Module], *, device: torch.device | str = "cpu", with_temperatures: bool = True
    ) -> "TeacherEnsemble":
        """The ensemble a stage's `teachers` and `combine` describe, over ``models`` (one per teacher).

        ``with_temperatures=False`` for models whose outputs are already divided by them.
        """
        entries, spec = stage.teachers, stage.combine
        return cls(
            models,
            names=[entry.model for entry in entries],
            weights=[entry.weight for entry in entries],
            temperatures=[entry.temperature if with_temperatures else 1.0 for entry in entries],
            method=spec.method,
            confidence=spec.confidence,
            confidence_temperature=spec.confidence_temperature,
            offload=spec.offload,
            device=device,
        )

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # teachers stay in eval mode

    @torch.no_grad()
    def all_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[B, K, C]``: each teacher's logits over its temperature, run one teacher at a time."""
        outputs = []
        for teacher, temperature in zip(self.teachers, self.temperatures):
            if self.offload:
                teacher.to(self.device)
            logits = teacher(inputs).float()
            if self.offload and self.device.type != "cpu":
                teacher.to("cpu")
            outputs.append(logits / temperature)
        classes = {o.shape[-1] for o in outputs}
        if len(classes) != 1:
            raise ValueError(f"the teachers {', '.join(self.names)} predict different numbers of classes: {sorted(classes)}")
        return torch.stack(outputs, dim=1)

    def combine(self, stacked: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble's log-probabilities ``[B, C]`` from ``all_logits`` (and labels, when given)."""
        from distill.losses.multi_teacher import combine_teachers

        method = self.method
        if method == "confidence" and self.confidence == "label" and labels is None:
            method = "mean"  # evaluation: no labels, fixed weights
        return combine_teachers(
            stacked,
            self.weights.to(stacked.device),
            labels,
            method=method,
            confidence=self.confidence,
            confidence_temperature=self.confidence_temperature,
        )

    def sources(self, inputs: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        stacked = self.all_logits(inputs)
        weights = self.weights.to(stacked.device).expand(stacked.shape[0], -1)
        return {"teachers.logits": stacked, "teachers.weights": weights, "teacher.logits": self.combine(stacked, labels)}

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.combine(self.all_logits(inputs))


class Cohort(nn.Module):
    """Networks trained together; ``forward`` returns ``[B, N, C]`` (member 0 is the stage's model)."""

    def __init__(self, members: Sequence[nn.Module], names: Sequence[str]) -> None:
        super().__init__()
        if len(members) < 2 or len(members) != len(names):
            raise ValueError("a cohort needs two or more networks, each with a name")
        self.members = nn.ModuleList(members)
        self.names = list(names)

    @property
    def primary(self) -> nn.Module:
        return self.members[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = [member(inputs) for member in self.members]
        classes = {o.shape[-1] for o in outputs}
        if len(classes) != 1:
            raise ValueError(f"the cohort's networks {', '.join(self.names)} predict different numbers of classes")
        return torch.stack(outputs, dim=1)


@torch.no_grad()
def per_sample_cross_entropy(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``[N]`` cross-entropy of ``model`` (eval mode) on every row, in float32, on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            logits = model(x).float()
            out.append(torch.nn.functional.cross_entropy(logits, y, reduction="none").cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def rows_where_better(
    better: nn.Module,
    worse: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    minimum: int = 1,
) -> torch.Tensor:
    """Indices of the rows where ``better`` has a strictly lower cross-entropy than ``worse`` (CoMD).

    When fewer than ``minimum`` rows qualify, the ``minimum`` rows with the largest margin
    ``CE(worse) - CE(better)`` instead (sorted by index). Each model passes over the rows once.
    """
    margin = per_sample_cross_entropy(worse, inputs, labels, batch_size, device) - per_sample_cross_entropy(
        better, inputs, labels, batch_size, device
    )
    rows = torch.nonzero(margin > 0).flatten()
    if len(rows) < minimum:
        rows = margin.argsort(descending=True)[:minimum].sort().values
    return rows


def cohort_names(keys: Sequence[str]) -> list[str]:
    """Names of a cohort's networks: the `models` key, with ``.<position>`` where a key repeats."""
    return [key if list(keys).count(key) == 1 else f"{key}.{i}" for i, key in enumerate(keys)]


class PrecomputedTeachers:
    """The teachers' logits over the training split, computed once, one teacher at a time.

    With ``combine: {precompute: true}`` a multi-teacher stage never holds two teachers in memory
    (nor any teacher while the student trains): each is loaded, run over the training, validation
    and test splits in eval mode, and freed. The stage then reads ``teachers.logits``,
    ``teachers.weights`` and ``teacher.logits`` by row from these tensors, like a cached teacher.
    Valid only when the training inputs are the same every epoch (no augmentation, no mixing).
    """

    def __init__(self, stacked: dict[str, torch.Tensor], ensemble: TeacherEnsemble) -> None:
        self.stacked = stacked  # split -> [N, K, C] float32 on the CPU
        self.ensemble = ensemble

    @classmethod
    def compute(cls, context: Any, stage: Any, before: int) -> "PrecomputedTeachers":
        from distill.engine.context import predict

        splits = {"train": context.data.train, "val": context.data.val, "test": context.data.test}
        per_split: dict[str, list[torch.Tensor]] = {name: [] for name, split in splits.items() if split is not None and len(split)}
        batch_size = context.experiment.data.eval_batch_size
        for entry in stage.teachers:
            model = context.frozen(entry.model, before=before)
            for name in per_split:
                per_split[name].append(predict(model, splits[name], batch_size, context).float().cpu() / entry.temperature)
            del model
            context.callbacks.on_message(f"stage '{stage.name}': teacher '{entry.model}' run over the data once (precompute)")
        # only its weights and combination rule are used: the temperatures were applied above
        ensemble = TeacherEnsemble.for_stage(stage, [nn.Identity() for _ in stage.teachers], with_temperatures=False)
        return cls({name: torch.stack(parts, dim=1) for name, parts in per_split.items()}, ensemble)

    def sources(self, rows: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        stacked = self.stacked["train"][rows.cpu()].to(device)
        weights = self.ensemble.weights.to(device).expand(stacked.shape[0], -1)
        return {"teachers.logits": stacked, "teachers.weights": weights, "teacher.logits": self.ensemble.combine(stacked, labels)}

    def predictions(self, split: str) -> torch.Tensor | None:
        """The ensemble's predicted classes on a split (fixed weights: no labels at evaluation)."""
        if split not in self.stacked:
            return None
        return self.ensemble.combine(self.stacked[split]).argmax(-1)
