"""The objective: a weighted sum of named terms reading named sources."""

from __future__ import annotations

import pytest
import torch

from distill.losses import cross_entropy, hinton_kd
from distill.objective import Objective, Term


def test_weighted_sum_and_each_term_reported() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    objective = Objective([Term("ce", "cross_entropy", weight=0.25), Term("kd", "hinton_kd", weight=0.75, params={"temperature": 3.0})])
    output = objective({"student.logits": student, "teacher.logits": teacher, "batch.labels": labels})
    ce, kd = cross_entropy(student, labels), hinton_kd(student, teacher, temperature=3.0)
    assert set(output.terms) == {"ce", "kd"}
    assert float(output.terms["ce"]) == pytest.approx(float(ce))
    assert float(output.total) == pytest.approx(float(0.25 * ce + 0.75 * kd))
    assert objective.needs_teacher and objective.required_sources == {"student.logits", "teacher.logits", "batch.labels"}


def test_inputs_can_be_rewired() -> None:
    # distill the teacher into itself from the labels' side: swap which logits are the student
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    term = Term("swapped", "hinton_kd", inputs={"student_logits": "teacher.logits", "teacher_logits": "student.logits"})
    value = Objective([term])({"student.logits": a, "teacher.logits": b}).total
    assert float(value) == pytest.approx(float(hinton_kd(b, a)))


def test_a_plain_python_loss_without_mask_or_reduction() -> None:
    def squared_gap(student_logits, teacher_logits, *, scale: float = 1.0):
        return scale * (student_logits - teacher_logits).pow(2).mean()

    objective = Objective([Term("gap", squared_gap, params={"scale": 2.0})])
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert float(objective({"student.logits": a, "teacher.logits": b}).total) == 2.0
    with pytest.raises(ValueError, match="takes no `mask`"):
        objective({"student.logits": a, "teacher.logits": b}, mask=torch.ones(2, dtype=torch.bool))


def test_errors_name_the_term() -> None:
    with pytest.raises(ValueError, match="term 'kd': unknown parameter\\(s\\) temp; allowed: temperature"):
        Term("kd", "hinton_kd", params={"temp": 2})
    with pytest.raises(ValueError, match="no tensor argument 'logits'"):
        Term("kd", "hinton_kd", inputs={"logits": "student.logits"})
    with pytest.raises(ValueError, match="names must be unique; repeated: a"):
        Objective([Term("a", "cross_entropy"), Term("a", "hinton_kd")])
    objective = Objective([Term("kd", "hinton_kd")])
    with pytest.raises(KeyError, match="term 'kd' reads teacher.logits"):
        objective({"student.logits": torch.randn(2, 3)})
