"""Diagnostics of a finished run: how similar the student's layers are to the teacher's.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML
2019; :func:`distill.losses.linear_cka`) between every (student layer, teacher layer) pair, on the
same samples of a split: which student layer resembles which teacher layer, whether distillation
made them closer, where a feature hint would connect the two. ``distill cka RUN_DIR`` prints the
matrix; in Python::

    from distill.diagnostics import cka_matrix
    student_layers, teacher_layers, matrix = cka_matrix(student, teacher, inputs)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.hooks import FeatureSource, capture_features, classifier_path, unwrap
from distill.losses import linear_cka


def default_layers(model: nn.Module) -> list[str]:
    """The model's stages: each item of a top-level ``ModuleList``/``Sequential`` of several blocks
    (``blocks.0``, ...) or else each top-level child with parameters (``layer1``, ...), without
    the classifier head, normalization layers and the input stem's single convolution."""
    model = unwrap(model)
    head = classifier_path(model) if any(isinstance(m, nn.Linear) for m in model.modules()) else None
    layers: list[str] = []
    for name, child in model.named_children():
        if name == head or not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 1:
            layers += [f"{name}.{index}" for index, item in enumerate(child) if any(True for _ in item.parameters())]
        elif not isinstance(child, (nn.BatchNorm2d, nn.LayerNorm, nn.BatchNorm1d, nn.Conv2d, nn.Linear)):
            layers.append(name)
    return layers


def layer_outputs(model: nn.Module, layers: list[str], inputs: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Each layer's output over ``inputs`` (eval mode), flattened to ``[N, D]`` float32 on the CPU."""
    sources = [FeatureSource("student", path, "output") for path in layers]
    values = capture_features(model, sources, inputs, batch_size)
    return {source.path: values[source.name] for source in sources}


def cka_matrix(
    student: nn.Module,
    teacher: nn.Module,
    inputs: torch.Tensor,
    student_layers: list[str] | None = None,
    teacher_layers: list[str] | None = None,
) -> tuple[list[str], list[str], torch.Tensor]:
    """Linear CKA ``[S, T]`` (float64) between the student's and the teacher's layers on ``inputs``.

    Layers default to :func:`default_layers`; a wrong path fails listing the nearest ones.
    """
    student_layers = student_layers or default_layers(student)
    teacher_layers = teacher_layers or default_layers(teacher)
    student_out = layer_outputs(student, student_layers, inputs)
    teacher_out = layer_outputs(teacher, teacher_layers, inputs)
    matrix = torch.empty(len(student_layers), len(teacher_layers), dtype=torch.float64)
    for i, s in enumerate(student_layers):
        x = student_out[s].double()
        for j, t in enumerate(teacher_layers):
            matrix[i, j] = linear_cka(x, teacher_out[t].double())
    return student_layers, teacher_layers, matrix


def run_cka(
    run_dir: str | Path,
    student: str,
    teacher: str,
    *,
    student_layers: list[str] | None = None,
    teacher_layers: list[str] | None = None,
    samples: int = 1000,
    split: str = "test",
) -> dict[str, Any]:
    """CKA between two models of a finished run (stage names, or a `models` key for a teacher)."""
    from distill.config import ConfigError, load_experiment
    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.context import STAGE_WEIGHTS
    from distill.engine.runner import CONFIG_FILE
    from distill.models.build import build_model, load_weights

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError([f"{run_dir} is not a run folder (no {CONFIG_FILE})"])
    experiment = load_experiment(run_dir / CONFIG_FILE)
    data = load_data(experiment.data)
    stages = {stage.name: stage for stage in experiment.stages}

    def network(name: str) -> nn.Module:
        key = stages[name].model if name in stages else name
        if key not in experiment.models:
            raise ConfigError([f"'{name}' is neither a stage of this run ({', '.join(stages)}) nor a key in its `models`"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(experiment.seed, "init", key))
            model = build_model(experiment.models[key], num_classes=data.num_classes, input_shape=data.input_shape)
        if name in stages:
            weights = run_dir / "stages" / name / STAGE_WEIGHTS
            if not weights.is_file():
                raise ConfigError([f"stage '{name}' has not finished in {run_dir} (no {weights.name})"])
            load_weights(model, weights)
        return model.eval()

    chosen = {"test": data.test, "val": data.val, "train": data.train}.get(split)
    if chosen is None or len(chosen) == 0:
        raise ConfigError([f"split '{split}' is empty or unknown; use test, val or train"])
    inputs = chosen.inputs[:samples]
    s_layers, t_layers, matrix = cka_matrix(network(student), network(teacher), inputs, student_layers, teacher_layers)
    return {
        "student": student,
        "teacher": teacher,
        "split": split,
        "samples": len(inputs),
        "student_layers": s_layers,
        "teacher_layers": t_layers,
        "cka": matrix.tolist(),
    }
