"""The shared contract, checked for every registered loss at once (new losses included).

Each loss is called through an Objective exactly as the engine calls it: masked positions hold
garbage and must not reach the value or the gradient, a fully masked batch gives 0 with a zero
gradient, bf16 inputs give a float32 value, extreme logits stay finite, the teacher gets no
gradient.
"""

from __future__ import annotations

import pytest
import torch

from distill.objective import DEFAULT_SOURCES, Objective, Term, tensor_arguments
from distill.registry import LOSSES, load_builtins

load_builtins()
CLASSES = 6
# Options that make a loss deterministic for the comparison of two calls (Swing adds noise).
DETERMINISTIC = {"swing_kd": {"noise_scale": 0.0}}
# Losses whose inputs are not [rows, C] logits / [rows, ...] features have the same properties
# tested in their own files: ranking scores (margin_mse), preference pairs [B, 2, T, V] (dckd,
# adpa: tests/test_losses_preference.py), hidden states with lm_head weights (fused_kd:
# tests/test_losses_chunked.py, tests/test_lm_engine.py).
OWN_CONTRACT_TESTS = {"margin_mse", "dckd", "adpa", "fused_kd", "sparse_kd", "redi", "qcrd", "kdrl", "grpo"}
NAMES = [entry.name for entry in LOSSES if entry.name not in OWN_CONTRACT_TESTS]
# Shapes of one sample of the feature sources (student, teacher), by the kind of input a loss
# declares with ``LOSSES.register(..., inputs=...)``: vectors by default, maps [C, H, W] (channels
# differ, as between a thin student and a wide teacher), tokens [N, D].
FEATURE_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "vectors": ((5,), (5,)),
    "maps": ((3, 4, 4), (5, 4, 4)),
    "tokens": ((4, 6), (4, 6)),
}


def _kind(name: str) -> str:
    kind = LOSSES.get(name).meta.get("inputs", "vectors")
    assert kind in FEATURE_SHAPES, f"{name}: unknown inputs kind '{kind}'"
    return kind


def _sources(
    rows: int, dtype: torch.dtype = torch.float32, scale: float = 3.0, kind: str = "vectors"
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student_shape, teacher_shape = FEATURE_SHAPES[kind]
    return {
        "student.logits": (torch.randn(rows, CLASSES, generator=generator) * scale).to(dtype).requires_grad_(True),
        "teacher.logits": (torch.randn(rows, CLASSES, generator=generator) * scale).to(dtype).requires_grad_(True),
        "batch.labels": torch.randint(0, CLASSES, (rows,), generator=generator),
        "student.features": torch.randn(rows, *student_shape, generator=generator).to(dtype).requires_grad_(True),
        "teacher.features": torch.randn(rows, *teacher_shape, generator=generator).to(dtype).requires_grad_(True),
        # which of a sample's patches were hidden (the last tokens of a token input are its patches)
        "batch.patch_mask": torch.rand(rows, 3, generator=generator) < 0.6,
        # mixed inputs: the second label and the weight of the first
        "batch.labels_b": torch.randint(0, CLASSES, (rows,), generator=generator),
        "batch.mix_lam": torch.rand(rows, generator=generator),
        # several teachers (K = 3) and an online cohort (N = 3)
        "teachers.logits": (torch.randn(rows, 3, CLASSES, generator=generator) * scale).to(dtype).requires_grad_(True),
        "teachers.weights": torch.tensor([0.5, 0.3, 0.2]).expand(rows, 3),
        "cohort.logits": (torch.randn(rows, 3, CLASSES, generator=generator) * scale).to(dtype).requires_grad_(True),
    }


def _objective(name: str) -> Objective:
    """The loss as a one-term objective; a module loss with ``setup`` is set up the way the engine
    does it, from its arguments' tensors over a "training set"."""
    torch.manual_seed(0)
    kind = _kind(name)
    shapes = {source: tensor.shape[1:] for source, tensor in _sources(2, kind=kind).items()}
    term = Term(name, name, params=dict(DETERMINISTIC.get(name, {})))
    objective = Objective([term], num_classes=CLASSES, source_shapes=shapes)
    module = dict(objective.losses.items()).get(name)
    if module is not None and callable(getattr(module, "setup", None)):
        training_set = _sources(32, kind=kind)

        def collect(arguments: list[str]) -> dict[str, torch.Tensor]:
            sources = {"teacher_features": "teacher.features", "labels": "batch.labels", **term.sources}
            return {argument: training_set[sources[argument]].detach() for argument in arguments}

        module.setup(collect)
    return objective


def test_every_registered_loss_is_covered() -> None:
    for name in NAMES:
        required, _ = tensor_arguments(LOSSES.get(name).builder)
        assert all(DEFAULT_SOURCES.get(argument) in _sources(2, kind=_kind(name)) for argument in required), name


@pytest.mark.parametrize("name", NAMES)
def test_masked_rows_do_not_matter(name: str) -> None:
    objective = _objective(name)
    rows = 8
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    clean = _sources(rows, kind=_kind(name))
    garbage = {k: v.detach().clone() for k, v in clean.items()}
    for key in ("student.logits", "teacher.logits", "student.features", "teacher.features", "teachers.logits", "cohort.logits"):
        garbage[key][~mask] = 1e30  # finite garbage where the mask is False
        garbage[key].requires_grad_(True)
    garbage["batch.labels"][~mask] = CLASSES - 1
    garbage["batch.labels_b"][~mask] = CLASSES - 1
    values = []
    for sources in (clean, garbage):
        value = objective(sources, mask=mask).total
        value.backward()
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1])
    assert torch.isfinite(values[1])
    for key in ("student.logits", "student.features", "cohort.logits"):
        grad = garbage[key].grad
        if grad is not None:
            assert torch.all(grad[~mask] == 0) and torch.isfinite(grad).all(), key
            torch.testing.assert_close(grad[mask], clean[key].grad[mask])
    for key in ("teacher.logits", "teacher.features", "teachers.logits"):
        assert garbage[key].grad is None, key  # the teacher side never receives gradient


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_gives_zero_and_zero_gradient(name: str) -> None:
    objective = _objective(name)
    sources = _sources(4, kind=_kind(name))
    value = objective(sources, mask=torch.zeros(4, dtype=torch.bool)).total
    value.backward()
    assert float(value.detach()) == 0.0
    for key in ("student.logits", "student.features", "cohort.logits"):
        grad = sources[key].grad
        assert grad is None or torch.all(grad == 0), key


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_and_extreme_inputs(name: str) -> None:
    objective = _objective(name)
    value = objective(_sources(6, dtype=torch.bfloat16, kind=_kind(name))).total
    assert value.dtype == torch.float32 and torch.isfinite(value)
    extreme = _sources(6, scale=1e4 / 3, kind=_kind(name))
    value = objective(extreme).total
    value.backward()
    assert torch.isfinite(value)
    grads = [extreme[key].grad for key in ("student.logits", "student.features", "cohort.logits") if extreme[key].grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    assert extreme["teacher.features"].grad is None and extreme["teacher.logits"].grad is None
