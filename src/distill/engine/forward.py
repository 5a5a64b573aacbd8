"""One forward pass of student and teacher, collecting every source the objective reads."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

from distill.hooks import FeatureCapture, parse_feature_source


def mask_patches(inputs: torch.Tensor, patch_size: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero a random ``ratio`` of the ``patch_size`` x ``patch_size`` patches of each image.

    Returns the masked images and the mask ``[B, patches]`` (True = hidden; patches in row-major
    order, the order of a ViT's patch tokens). Each image hides exactly ``round(ratio * patches)``
    patches (at least one, at most all but one), drawn from the global RNG (checkpointed, so a
    resumed run draws the same masks). Inputs are normalized, so zero is the training mean.
    """
    if inputs.dim() != 4:
        raise ValueError(f"input_mask needs images [B, C, H, W]; got inputs of shape {tuple(inputs.shape)}")
    batch, _, height, width = inputs.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"input_mask.patch_size {patch_size} must divide the image size {height}x{width}")
    rows, cols = height // patch_size, width // patch_size
    patches = rows * cols
    hidden = min(max(1, round(ratio * patches)), patches - 1) if patches > 1 else 1
    order = torch.rand(batch, patches, device=inputs.device).argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=inputs.device)
    mask.scatter_(1, order[:, :hidden], True)
    pixels = mask.view(batch, 1, rows, 1, cols, 1).expand(batch, 1, rows, patch_size, cols, patch_size)
    pixels = pixels.reshape(batch, 1, height, width)
    return inputs.masked_fill(pixels, 0.0), mask


class ForwardPass:
    """Runs the trained model and the teacher on a batch and returns ``{source: tensor}``.

    ``student`` is the unwrapped trained model (hooks are registered on it, so they also fire
    when a DDP wrapper calls it); ``model`` is what is called (the wrapper, or the same module).
    Only the sources in ``required`` are produced: the teacher runs only when a term reads it,
    and only the requested submodule inputs/outputs are captured. Use as a context manager so
    that the hooks are removed afterwards.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module | None,
        required: Iterable[str],
        autocast: Callable[[], Any] = contextlib.nullcontext,
        input_mask: Any = None,
        lm: bool = False,
        reference: torch.nn.Module | None = None,
        mix: Any = None,
    ) -> None:
        from distill.engine.teachers import Cohort, TeacherEnsemble

        self.mix = mix
        self.cohort = isinstance(student, Cohort)
        self.ensemble = isinstance(teacher, TeacherEnsemble)
        self.input_mask = input_mask
        self.lm = lm
        self.reference = reference
        self.student = student
        self.model: torch.nn.Module = student
        self.teacher = teacher
        self.required = set(required)
        self.autocast = autocast
        features = [parse_feature_source(s) for s in self.required]
        features = [f for f in features if f is not None]
        # a cohort's student features are those of its first network, the stage's `model`
        captured = student.primary if self.cohort else student  # type: ignore[union-attr]
        self.student_capture = FeatureCapture(captured, [f for f in features if f.model == "student"], "student")
        teacher_features = [f for f in features if f.model == "teacher"]
        if teacher_features and teacher is None:
            raise ValueError(f"the objective reads {teacher_features[0].name}, but the stage has no teacher")
        if teacher_features and self.ensemble:
            raise ValueError(
                f"the objective reads {teacher_features[0].name}, but the stage has several teachers: "
                "their features are not combined; read teachers.logits or teacher.logits (the ensemble)"
            )
        self.teacher_capture = FeatureCapture(teacher, teacher_features, "teacher") if teacher is not None else None
        self.runs_teacher = teacher is not None and any(s.startswith(("teacher.", "teachers.")) for s in self.required)
        self.runs_reference = any(s.startswith("reference.") for s in self.required)
        if self.runs_reference and reference is None:
            raise ValueError("the objective reads reference.logits, but the stage has no reference model")

    def __enter__(self) -> "ForwardPass":
        self.student_capture.__enter__()
        if self.teacher_capture is not None:
            self.teacher_capture.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.student_capture.__exit__(*exc)
        if self.teacher_capture is not None:
            self.teacher_capture.__exit__(*exc)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.lm:
            return self._language_model(inputs, labels)
        extra: dict[str, torch.Tensor] = {}
        if self.mix is not None and self.student.training:
            # mixup / CutMix: teacher and student both see the same mixed inputs
            from distill.augment.mixing import mix_batch

            mixed = mix_batch(inputs, labels, method=self.mix.method, alpha=self.mix.alpha, fraction=self.mix.fraction)
            inputs, labels = mixed.inputs, mixed.labels_a
            extra["batch.labels_b"], extra["batch.mix_lam"] = mixed.labels_b, mixed.lam
        student_inputs = inputs
        if self.input_mask is not None and self.student.training:
            student_inputs, extra["batch.patch_mask"] = mask_patches(inputs, self.input_mask.patch_size, self.input_mask.ratio)
        with self.autocast():
            sources: dict[str, torch.Tensor] = {"batch.labels": labels, "batch.inputs": inputs, **extra}
            output = self.model(student_inputs)
            if self.cohort:
                sources["cohort.logits"], sources["student.logits"] = output, output[:, 0]
            else:
                sources["student.logits"] = output
            sources.update(self.student_capture.values)
            self.student_capture.clear()
            if self.runs_teacher:
                assert self.teacher is not None and self.teacher_capture is not None
                with torch.no_grad():
                    if self.ensemble:
                        sources.update(self.teacher.sources(inputs, labels))  # type: ignore[operator]
                    else:
                        sources["teacher.logits"] = self.teacher(inputs)
                sources.update(self.teacher_capture.values)
                self.teacher_capture.clear()
        return sources

    def _language_model(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sources of a token batch: logits and/or final hidden states (only what terms read), the
        output projections for the fused loss, the target mask, and captured submodule outputs."""
        from distill.data.base import IGNORE_INDEX

        sources: dict[str, torch.Tensor] = {"batch.labels": labels, "batch.inputs": input_ids, "batch.mask": labels != IGNORE_INDEX}
        # Preference pairs [B, 2, T] (or any [..., T]) run as [B * 2, T] rows and come back in their shape.
        leading = tuple(input_ids.shape[:-1])
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        with self.autocast():
            if self.runs_reference:
                assert self.reference is not None
                with torch.no_grad():
                    sources["reference.logits"] = _unflatten(self.reference(input_ids), leading)
            student = {k: _unflatten(v, leading) for k, v in _run_lm(self.model, input_ids, "student", self.required).items()}
            if "student.lm_head" in self.required:
                student["student.lm_head"] = self.student.lm_head_weight
            sources.update(student)
            sources.update(self.student_capture.values)
            self.student_capture.clear()
            if self.runs_teacher:
                assert self.teacher is not None and self.teacher_capture is not None
                with torch.no_grad():
                    teacher = {k: _unflatten(v, leading) for k, v in _run_lm(self.teacher, input_ids, "teacher", self.required).items()}
                if "teacher.lm_head" in self.required:
                    teacher["teacher.lm_head"] = self.teacher.lm_head_weight.detach()
                sources.update(teacher)
                sources.update(self.teacher_capture.values)
                self.teacher_capture.clear()
        return sources

    @torch.no_grad()
    def probe_shapes(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[int, ...]]:
        """Shape of one sample of every source, from a forward pass in eval mode (no state changes)."""
        was_training = self.student.training
        self.student.eval()
        try:
            with self:
                sources = self(inputs, labels)
        finally:
            self.student.train(was_training)
        return {name: tuple(value.shape[1:]) for name, value in sources.items()}


def _unflatten(value: torch.Tensor, leading: tuple[int, ...]) -> torch.Tensor:
    return value.reshape(*leading, *value.shape[1:]) if len(leading) > 1 else value


def _run_lm(model: torch.nn.Module, input_ids: torch.Tensor, role: str, required: set[str]) -> dict[str, torch.Tensor]:
    """Call a :class:`~distill.models.causal_lm.CausalLM` (or its DDP wrapper) for what ``required`` reads.

    Logits are computed when ``<role>.logits`` is read, or when nothing else is (the model must run
    for its captured features); the final hidden states when ``<role>.last_hidden`` is read.
    """
    wants_hidden = f"{role}.last_hidden" in required
    wants_logits = f"{role}.logits" in required or not wants_hidden
    if wants_hidden and wants_logits:
        hidden, logits = model(input_ids, output="both")
        return {f"{role}.last_hidden": hidden, f"{role}.logits": logits}
    if wants_hidden:
        return {f"{role}.last_hidden": model(input_ids, output="hidden")}
    return {f"{role}.logits": model(input_ids)}
