"""DCKD and ADPA on preference pairs (Gao et al., ICLR 2025): values against a hand-written
float64 loop, gradients, masking, reductions, and the property that defines each loss."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import adpa, cross_entropy, dckd
from distill.objective import Objective, Term
from distill.registry import LOSSES

B, T, V = 2, 5, 6


def _pairs(
    seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0
) -> dict[str, torch.Tensor]:
    """A small batch of preference pairs: logits [B, 2, T, V], labels and mask [B, 2, T].

    The first position of every response is prompt (label -100), the chosen response of the
    second pair is padded at the end (mask False), and the rejected response of the first pair
    has an interior label -100.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, 2, T), generator=g)
    labels[..., 0] = -100
    labels[0, 1, 2] = -100
    mask = torch.ones(B, 2, T, dtype=torch.bool)
    mask[1, 0, -2:] = False
    return {
        "student": (torch.randn(B, 2, T, V, generator=g) * scale).to(dtype),
        "teacher": (torch.randn(B, 2, T, V, generator=g) * scale).to(dtype),
        "reference": (torch.randn(B, 2, T, V, generator=g) * scale).to(dtype),
        "labels": labels,
        "mask": mask,
    }


def _log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_z for x in scaled]


def _loop(per_position, data, reduction: str) -> torch.Tensor:
    """Reduce ``per_position(b, side, t)`` over the counted positions, by explicit loops."""
    labels, mask = data["labels"], data["mask"]
    out = torch.zeros(B, 2, T, dtype=torch.float64)
    count = 0
    for b in range(B):
        for side in range(2):
            for t in range(T):
                if int(labels[b, side, t]) == -100 or not bool(mask[b, side, t]):
                    continue
                out[b, side, t] = per_position(b, side, t)
                count += 1
    if reduction == "none":
        return out
    total = out.sum()
    return total if reduction == "sum" else total / count


def _reference_dckd(
    data,
    *,
    chosen_weight,
    rejected_weight,
    direction,
    temperature,
    sft_weight,
    reduction,
):
    s, te, labels = data["student"].double(), data["teacher"].double(), data["labels"]

    def per_position(b: int, side: int, t: int) -> float:
        log_q = _log_softmax(s[b, side, t].tolist(), temperature)
        log_p = _log_softmax(te[b, side, t].tolist(), temperature)
        if direction == "forward":
            kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
        else:
            kl = sum(math.exp(lq) * (lq - lp) for lp, lq in zip(log_p, log_q))
        value = (chosen_weight if side == 0 else rejected_weight) * kl
        if side == 0:
            value += (
                sft_weight
                * -_log_softmax(s[b, side, t].tolist())[int(labels[b, side, t])]
            )
        return value

    return _loop(per_position, data, reduction)


def _reference_adpa(
    data, *, chosen_weight, rejected_weight, beta, sft_weight, reduction
):
    s, te, ref, labels = (
        data["student"].double(),
        data["teacher"].double(),
        data["reference"].double(),
        data["labels"],
    )

    def per_position(b: int, side: int, t: int) -> float:
        log_q = _log_softmax(s[b, side, t].tolist())
        log_teacher = _log_softmax(te[b, side, t].tolist())
        log_ref = _log_softmax(ref[b, side, t].tolist())
        expected = sum(
            math.exp(lq) * beta * (lt - lr)
            for lq, lt, lr in zip(log_q, log_teacher, log_ref)
        )
        value = -(chosen_weight if side == 0 else rejected_weight) * expected
        if side == 0:
            value += sft_weight * -log_q[int(labels[b, side, t])]
        return value

    return _loop(per_position, data, reduction)


# --- values against the loop --------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {
            "chosen_weight": 1.0,
            "rejected_weight": 1.0,
            "direction": "forward",
            "temperature": 1.0,
            "sft_weight": 0.0,
        },
        {
            "chosen_weight": 0.1,
            "rejected_weight": 0.1,
            "direction": "forward",
            "temperature": 1.0,
            "sft_weight": 1.0,
        },
        {
            "chosen_weight": 0.7,
            "rejected_weight": 0.2,
            "direction": "reverse",
            "temperature": 2.0,
            "sft_weight": 0.5,
        },
    ],
)
def test_dckd_matches_loop(options: dict, reduction: str) -> None:
    data = _pairs(1)
    value = dckd(
        data["student"],
        data["teacher"],
        data["labels"],
        mask=data["mask"],
        reduction=reduction,
        **options,
    )
    expected = _reference_dckd(data, reduction=reduction, **options)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {"chosen_weight": 0.0, "rejected_weight": 1.0, "beta": 1.0, "sft_weight": 0.0},
        {"chosen_weight": 0.5, "rejected_weight": 1.6, "beta": 0.1, "sft_weight": 1.0},
    ],
)
def test_adpa_matches_loop(options: dict, reduction: str) -> None:
    data = _pairs(2)
    value = adpa(
        data["student"],
        data["teacher"],
        data["reference"],
        data["labels"],
        mask=data["mask"],
        reduction=reduction,
        **options,
    )
    expected = _reference_adpa(data, reduction=reduction, **options)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_defaults_are_the_documented_ones() -> None:
    data = _pairs(3)
    torch.testing.assert_close(
        dckd(data["student"], data["teacher"], data["labels"], mask=data["mask"]),
        _reference_dckd(
            data,
            chosen_weight=1.0,
            rejected_weight=1.0,
            direction="forward",
            temperature=1.0,
            sft_weight=0.0,
            reduction="batchmean",
        ),
    )
    torch.testing.assert_close(
        adpa(
            data["student"],
            data["teacher"],
            data["reference"],
            data["labels"],
            mask=data["mask"],
        ),
        _reference_adpa(
            data,
            chosen_weight=0.0,
            rejected_weight=1.0,
            beta=1.0,
            sft_weight=0.0,
            reduction="batchmean",
        ),
    )


def test_sft_part_is_the_chosen_cross_entropy() -> None:
    data = _pairs(4)
    only_sft = dckd(
        data["student"],
        data["teacher"],
        data["labels"],
        chosen_weight=0.0,
        rejected_weight=0.0,
        sft_weight=1.0,
        mask=data["mask"],
        reduction="sum",
    )
    chosen_ce = cross_entropy(
        data["student"][:, 0],
        data["labels"][:, 0],
        mask=data["mask"][:, 0],
        reduction="sum",
    )
    torch.testing.assert_close(only_sft, chosen_ce)
    only_sft_adpa = adpa(
        data["student"],
        data["teacher"],
        data["reference"],
        data["labels"],
        chosen_weight=0.0,
        rejected_weight=0.0,
        sft_weight=1.0,
        mask=data["mask"],
        reduction="sum",
    )
    torch.testing.assert_close(only_sft_adpa, chosen_ce)


# --- gradients ----------------------------------------------------------------------------------


def test_gradcheck_float64() -> None:
    data = _pairs(5, scale=1.0)
    student = data["student"].clone().requires_grad_(True)

    def dckd_fn(x: torch.Tensor) -> torch.Tensor:
        return dckd(
            x,
            data["teacher"],
            data["labels"],
            chosen_weight=0.7,
            rejected_weight=0.3,
            sft_weight=0.5,
            temperature=1.5,
            mask=data["mask"],
        )

    def dckd_reverse_fn(x: torch.Tensor) -> torch.Tensor:
        return dckd(
            x,
            data["teacher"],
            data["labels"],
            direction="reverse",
            mask=data["mask"],
            reduction="none",
        )

    def adpa_fn(x: torch.Tensor) -> torch.Tensor:
        return adpa(
            x,
            data["teacher"],
            data["reference"],
            data["labels"],
            chosen_weight=0.4,
            beta=0.5,
            sft_weight=1.0,
            mask=data["mask"],
        )

    for fn in (dckd_fn, dckd_reverse_fn, adpa_fn):
        assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-7)


def test_adpa_gradient_is_centred_advantage() -> None:
    """d/dz_a of -sum_v q_v A_v is -q_a (A_a - E_q[A]) per position (divided by the count)."""
    data = _pairs(6)
    student = data["student"].clone().requires_grad_(True)
    adpa(
        student,
        data["teacher"],
        data["reference"],
        data["labels"],
        chosen_weight=1.0,
        mask=data["mask"],
        reduction="sum",
    ).backward()
    q = torch.softmax(data["student"], -1)
    advantage = torch.log_softmax(data["teacher"], -1) - torch.log_softmax(
        data["reference"], -1
    )
    expected = -q * (advantage - (q * advantage).sum(-1, keepdim=True))
    counted = (data["labels"] != -100) & data["mask"]
    expected[~counted] = 0.0
    torch.testing.assert_close(student.grad, expected)


def test_teacher_and_reference_get_no_gradient() -> None:
    data = _pairs(7)
    student = data["student"].clone().requires_grad_(True)
    teacher = data["teacher"].clone().requires_grad_(True)
    reference = data["reference"].clone().requires_grad_(True)
    total = dckd(student, teacher, data["labels"], mask=data["mask"]) + adpa(
        student,
        teacher,
        reference,
        data["labels"],
        chosen_weight=1.0,
        mask=data["mask"],
    )
    total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and reference.grad is None


# --- masking and reductions ---------------------------------------------------------------------


def _call(name: str, data: dict, student: torch.Tensor, **kwargs) -> torch.Tensor:
    if name == "dckd":
        return dckd(student, data["teacher"], data["labels"], sft_weight=0.5, **kwargs)
    return adpa(
        student,
        data["teacher"],
        data["reference"],
        data["labels"],
        chosen_weight=0.5,
        sft_weight=0.5,
        **kwargs,
    )


@pytest.mark.parametrize("name", ["dckd", "adpa"])
def test_masked_and_ignored_positions_change_nothing(name: str) -> None:
    clean = _pairs(8, dtype=torch.float32)
    counted = (clean["labels"] != -100) & clean["mask"]
    garbage = {k: v.clone() for k, v in clean.items()}
    for key in ("student", "teacher", "reference"):
        garbage[key][~counted] = 1e30
    garbage["labels"][~clean["mask"]] = (
        V - 1
    )  # padding may hold any label; the mask rules
    results = []
    for data in (clean, garbage):
        student = data["student"].clone().requires_grad_(True)
        value = _call(name, data, student, mask=data["mask"])
        value.backward()
        results.append((value.detach(), student.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert torch.isfinite(results[1][0])
    assert (
        torch.all(results[1][1][~counted] == 0) and torch.isfinite(results[1][1]).all()
    )
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("name", ["dckd", "adpa"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_fully_masked_gives_zero_and_zero_gradient(name: str, reduction: str) -> None:
    data = _pairs(9, dtype=torch.float32)
    student = data["student"].clone().requires_grad_(True)
    value = _call(
        name,
        data,
        student,
        mask=torch.zeros(B, 2, T, dtype=torch.bool),
        reduction=reduction,
    )
    assert torch.all(value == 0)
    value.sum().backward()
    assert student.grad is None or torch.all(student.grad == 0)
    data["labels"][:] = -100  # no target anywhere: the same
    student = data["student"].clone().requires_grad_(True)
    value = _call(name, data, student, reduction=reduction)
    assert torch.all(value == 0)


@pytest.mark.parametrize("name", ["dckd", "adpa"])
def test_reductions_are_consistent(name: str) -> None:
    data = _pairs(10)
    counted = (data["labels"] != -100) & data["mask"]
    per_position = _call(
        name, data, data["student"], mask=data["mask"], reduction="none"
    )
    total = _call(name, data, data["student"], mask=data["mask"], reduction="sum")
    mean = _call(name, data, data["student"], mask=data["mask"], reduction="batchmean")
    assert per_position.shape == (B, 2, T)
    assert torch.all(per_position[~counted] == 0)
    torch.testing.assert_close(per_position.sum(), total)
    torch.testing.assert_close(mean * int(counted.sum()), total)


@pytest.mark.parametrize("name", ["dckd", "adpa"])
def test_low_precision_gives_float32(name: str) -> None:
    data = _pairs(11, dtype=torch.bfloat16)
    value = _call(name, data, data["student"], mask=data["mask"])
    assert value.dtype == torch.float32 and torch.isfinite(value)


# --- the defining properties --------------------------------------------------------------------


def test_dckd_zero_iff_student_matches_teacher_on_both_responses() -> None:
    data = _pairs(12)
    teacher = data["teacher"]
    assert float(
        dckd(teacher.clone(), teacher, data["labels"], mask=data["mask"])
    ) == pytest.approx(0.0, abs=1e-12)
    assert float(
        dckd(
            teacher.clone(),
            teacher,
            data["labels"],
            direction="reverse",
            mask=data["mask"],
        )
    ) == pytest.approx(0.0, abs=1e-12)
    # a difference on the rejected response alone is penalized: the second constraint
    only_rejected = teacher.clone()
    only_rejected[:, 1] += torch.randn(
        B, T, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert float(dckd(only_rejected, teacher, data["labels"], mask=data["mask"])) > 1e-3
    assert float(
        dckd(
            only_rejected,
            teacher,
            data["labels"],
            rejected_weight=0.0,
            mask=data["mask"],
        )
    ) == pytest.approx(0.0, abs=1e-12)
    # and one on the chosen response alone by the first
    only_chosen = teacher.clone()
    only_chosen[:, 0] += torch.randn(
        B, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    assert float(dckd(only_chosen, teacher, data["labels"], mask=data["mask"])) > 1e-3
    assert float(
        dckd(only_chosen, teacher, data["labels"], chosen_weight=0.0, mask=data["mask"])
    ) == pytest.approx(0.0, abs=1e-12)
    # shifting logits by a constant changes no distribution
    assert float(
        dckd(teacher + 3.0, teacher, data["labels"], mask=data["mask"])
    ) == pytest.approx(0.0, abs=1e-12)


def test_dckd_gradient_descent_moves_the_student_toward_the_teacher() -> None:
    data = _pairs(13)
    student = data["student"].clone().requires_grad_(True)
    before = dckd(student, data["teacher"], data["labels"], mask=data["mask"])
    before.backward()
    with torch.no_grad():
        after = dckd(
            student - 0.5 * student.grad,
            data["teacher"],
            data["labels"],
            mask=data["mask"],
        )
    assert float(after) < float(before.detach())


def test_adpa_step_raises_positive_and_lowers_negative_advantage_tokens() -> None:
    """Teacher = reference except token 1 (more likely after alignment) and token 4 (less likely):
    one gradient-descent step on the student raises log pi(1) and lowers log pi(4) at every counted
    rejected position, and raises the expected advantage."""
    data = _pairs(14)
    reference = data["reference"]
    teacher = reference.clone()
    teacher[..., 1] += 2.0
    teacher[..., 4] -= 2.0
    advantage = torch.log_softmax(teacher, -1) - torch.log_softmax(reference, -1)
    assert torch.all(advantage[..., 1] > 0) and torch.all(advantage[..., 4] < 0)
    student = data["student"].clone().requires_grad_(True)
    value = adpa(
        student, teacher, reference, data["labels"], mask=data["mask"], reduction="sum"
    )
    value.backward()
    with torch.no_grad():
        stepped = student - 0.1 * student.grad
    log_before, log_after = (
        torch.log_softmax(data["student"], -1),
        torch.log_softmax(stepped, -1),
    )
    counted = (data["labels"] != -100) & data["mask"]
    rejected = counted.clone()
    rejected[:, 0] = False
    assert torch.all(log_after[..., 1][rejected] > log_before[..., 1][rejected])
    assert torch.all(log_after[..., 4][rejected] < log_before[..., 4][rejected])
    # chosen responses are untouched under the default weights (advantage on the rejected side only)
    assert torch.all(student.grad[:, 0] == 0)
    expected_before = (log_before.exp() * advantage).sum(-1)[rejected]
    expected_after = (log_after.exp() * advantage).sum(-1)[rejected]
    assert torch.all(expected_after > expected_before)
    with torch.no_grad():
        assert float(
            adpa(
                stepped,
                teacher,
                reference,
                data["labels"],
                mask=data["mask"],
                reduction="sum",
            )
        ) < float(value.detach())


def test_adpa_is_zero_without_advantage() -> None:
    """An aligned teacher equal to its reference gives no advantage: value 0, gradient 0."""
    data = _pairs(15)
    student = data["student"].clone().requires_grad_(True)
    value = adpa(
        student,
        data["reference"] + 1.0,
        data["reference"],
        data["labels"],
        chosen_weight=1.0,
        mask=data["mask"],
    )
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(student.grad.abs().max()) < 1e-12


def test_adpa_scales_with_beta() -> None:
    data = _pairs(16)
    args = (data["student"], data["teacher"], data["reference"], data["labels"])
    torch.testing.assert_close(
        adpa(*args, beta=0.25, mask=data["mask"]), 0.25 * adpa(*args, mask=data["mask"])
    )


# --- validation and the objective ---------------------------------------------------------------


def test_invalid_inputs_raise() -> None:
    data = _pairs(17)
    s, t, r, y = data["student"], data["teacher"], data["reference"], data["labels"]
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, T, V\]"):
        dckd(s.reshape(2 * B, T, V), t.reshape(2 * B, T, V), y.reshape(2 * B, T))
    with pytest.raises(ValueError, match="teacher_logits"):
        dckd(s, t[..., :-1], y)
    with pytest.raises(ValueError, match="reference_logits"):
        adpa(s, t, r[:, :, :-1], y)
    with pytest.raises(ValueError, match="labels"):
        adpa(s, t, r, y[..., :-1])
    with pytest.raises(ValueError, match="direction"):
        dckd(s, t, y, direction="sideways")
    with pytest.raises(ValueError, match="rejected_weight"):
        dckd(s, t, y, rejected_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        adpa(s, t, r, y, beta=0.0)
    with pytest.raises(ValueError, match="mask"):
        dckd(s, t, y, mask=data["mask"][:, 0])
    with pytest.raises(ValueError, match="reduction"):
        dckd(s, t, y, reduction="mean")


def test_registered_and_reference_source_is_required() -> None:
    assert "dckd" in LOSSES and "adpa" in LOSSES
    assert LOSSES.get("dckd").builder is dckd and LOSSES.get("adpa").builder is adpa
    with pytest.raises(ValueError, match="reference_logits"):
        Term("adpa", "adpa")  # no default source for the reference model's logits


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_objective_with_dckd_and_adpa(reduction: str) -> None:
    data = _pairs(18, dtype=torch.float32)
    sources = {
        "student.logits": data["student"].clone().requires_grad_(True),
        "teacher.logits": data["teacher"],
        "reference.logits": data["reference"],
        "batch.labels": data["labels"],
        "batch.mask": data["mask"],
    }
    objective = Objective(
        [
            Term(
                "dckd",
                "dckd",
                weight=0.5,
                params={
                    "chosen_weight": 0.1,
                    "rejected_weight": 0.1,
                    "sft_weight": 1.0,
                },
            ),
            Term(
                "adpa",
                "adpa",
                weight=1.6,
                inputs={"reference_logits": "reference.logits"},
            ),
        ]
    )
    assert objective.required_sources == {
        "student.logits",
        "teacher.logits",
        "reference.logits",
        "batch.labels",
    }
    out = objective(sources, mask=sources["batch.mask"], reduction=reduction)
    expected_dckd = dckd(
        data["student"],
        data["teacher"],
        data["labels"],
        chosen_weight=0.1,
        rejected_weight=0.1,
        sft_weight=1.0,
        mask=data["mask"],
        reduction=reduction,
    )
    expected_adpa = adpa(
        data["student"],
        data["teacher"],
        data["reference"],
        data["labels"],
        mask=data["mask"],
        reduction=reduction,
    )
    torch.testing.assert_close(out.terms["dckd"], expected_dckd)
    torch.testing.assert_close(out.terms["adpa"], expected_adpa)
    torch.testing.assert_close(out.total, 0.5 * expected_dckd + 1.6 * expected_adpa)
    out.total.backward()
    grad = sources["student.logits"].grad
    counted = (data["labels"] != -100) & data["mask"]
    assert torch.all(grad[~counted] == 0) and grad[counted].abs().sum() > 0
