"""QCRD (Wang et al.): the quality-weighted contrastive loss against a float64 loop, gradients,
the online discriminator (its own gradient, what it learns, warm-up), masking and the per-pair
reductions under gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import QCRD, qcrd_loss
from distill.losses.redi import count_pairs
from distill.objective import Objective, Term
from distill.registry import LOSSES
from tests.loss_references import Side, pair_reference

B, T, V, H = 4, 6, 5, 8


def _pairs(seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Pairs with a prompt position, a masked tail (pair 1's positive) and a pair without a negative (pair 2)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, 2, T), generator=g)
    labels[..., 0] = -100
    labels[2, 1, :] = -100
    mask = torch.ones(B, 2, T, dtype=torch.bool)
    mask[1, 0, -2:] = False
    return {
        "student": (torch.randn(B, 2, T, V, generator=g) * scale).to(dtype),
        "hidden": torch.randn(B, 2, T, H, generator=g).to(dtype),
        "labels": labels,
        "mask": mask,
        "quality": torch.rand(B, 2, generator=g).to(dtype),
    }


def _reference(data: dict, *, contrast: str, margin: float, negative_weight: float, weight_positives: bool,
               quality: torch.Tensor | None, reduction: str) -> torch.Tensor:
    def pair_loss(b: int, positive: Side, negative: Side) -> float:
        nll_pos, nll_neg = -positive[0], -negative[0]
        if negative[1] == 0:
            c = 0.0
        elif contrast == "margin":
            c = max(margin - nll_neg, 0.0)
        else:
            c = math.log1p(math.exp(margin - (nll_neg - nll_pos)))
        w_pos = float(quality[b, 0]) if (quality is not None and weight_positives) else 1.0
        w_neg = 1.0 - float(quality[b, 1]) if quality is not None else 1.0
        return w_pos * nll_pos + negative_weight * w_neg * c

    return pair_reference(data, pair_loss, reduction)


def _module(**params) -> QCRD:
    torch.manual_seed(0)
    return QCRD(input_shapes={"student_hidden": (2, T, H)}, **params).double()


# --- the loss for given qualities -----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {"contrast": "margin", "margin": 3.0, "negative_weight": 0.2, "weight_positives": True},
        {"contrast": "margin", "margin": 1.5, "negative_weight": 1.0, "weight_positives": False},
        {"contrast": "sigmoid", "margin": 0.5, "negative_weight": 0.7, "weight_positives": True},
    ],
)
@pytest.mark.parametrize("with_quality", [True, False])
def test_loss_matches_loop(options: dict, reduction: str, with_quality: bool) -> None:
    data = _pairs(1, scale=0.7)  # small logits: NLLs below the margin, so the hinge is active
    quality = data["quality"] if with_quality else None
    value = qcrd_loss(
        data["student"], data["labels"],
        None if quality is None else quality[:, 0], None if quality is None else quality[:, 1],
        mask=data["mask"], reduction=reduction, **options,
    )
    expected = _reference(data, quality=quality, reduction=reduction, **options)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_default_margins_are_documented() -> None:
    data = _pairs(2, scale=0.7)
    for contrast, margin in (("margin", 3.0), ("sigmoid", 0.0)):
        torch.testing.assert_close(
            qcrd_loss(data["student"], data["labels"], contrast=contrast, mask=data["mask"]),
            _reference(data, contrast=contrast, margin=margin, negative_weight=0.2, weight_positives=True,
                       quality=None, reduction="batchmean"),
        )


def test_hinge_stops_pushing_a_negative_beyond_the_margin() -> None:
    """contrast='margin': a negative whose token-averaged NLL exceeds the margin gets no gradient."""
    data = _pairs(3, scale=0.5)
    student = data["student"].clone().requires_grad_(True)
    qcrd_loss(student, data["labels"], margin=0.1, mask=data["mask"], reduction="sum").backward()
    assert torch.all(student.grad[:, 1] == 0)  # every NLL of a 5-way softmax near uniform is > 0.1
    student.grad = None
    qcrd_loss(student, data["labels"], margin=10.0, mask=data["mask"], reduction="sum").backward()
    counted = (data["labels"] != -100) & data["mask"]
    assert torch.all(student.grad[:, 1][counted[:, 1]].abs().sum(-1) > 0)


def test_gradcheck_float64() -> None:
    data = _pairs(4, scale=1.0)
    student = data["student"].clone().requires_grad_(True)
    for options in ({}, {"contrast": "sigmoid", "margin": 0.3}, {"reduction": "none", "margin": 4.0}):
        assert torch.autograd.gradcheck(
            lambda x, o=options: qcrd_loss(x, data["labels"], data["quality"][:, 0], data["quality"][:, 1],
                                           mask=data["mask"], **o),
            (student,), eps=1e-6, atol=1e-7,
        )
    module = _module(margin=4.0)
    assert torch.autograd.gradcheck(
        lambda x: module(x, data["hidden"], data["labels"], mask=data["mask"]), (student,), eps=1e-6, atol=1e-7
    )


# --- the module and its discriminator -------------------------------------------------------------


def test_module_is_the_loss_with_its_discriminator_scores() -> None:
    data = _pairs(5, scale=0.7)
    module = _module(negative_weight=0.5)
    with torch.no_grad():  # a discriminator that is not at its initial 0.5 everywhere
        module.discriminator.head[-1].weight.normal_(0, 1.0)
    quality = module.quality(data["hidden"], data["labels"], mask=data["mask"])
    assert quality.shape == (B, 2) and not torch.allclose(quality, torch.full_like(quality, 0.5))
    for reduction in ("batchmean", "sum", "none"):
        value = module(data["student"], data["hidden"], data["labels"], mask=data["mask"], reduction=reduction)
        expected = qcrd_loss(data["student"], data["labels"], quality[:, 0], quality[:, 1], negative_weight=0.5,
                             mask=data["mask"], reduction=reduction)
        torch.testing.assert_close(value, expected)


def test_untrained_discriminator_scores_one_half() -> None:
    data = _pairs(6)
    quality = _module().quality(data["hidden"], data["labels"], mask=data["mask"])
    torch.testing.assert_close(quality, torch.full((B, 2), 0.5, dtype=torch.float64))


def test_discriminator_gets_the_bce_gradient_and_the_student_does_not() -> None:
    data = _pairs(7, scale=0.7)
    module = _module(discriminator_weight=0.5)
    with torch.no_grad():
        module.discriminator.head[-1].weight.normal_(0, 1.0)
    student = data["student"].clone().requires_grad_(True)
    hidden = data["hidden"].clone().requires_grad_(True)
    value = module(student, hidden, data["labels"], mask=data["mask"], reduction="sum")
    value.backward()
    assert hidden.grad is None  # the discriminator reads detached states
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    # the same gradient from the BCE written out: positives 1, negatives 0, present sequences only
    logits = module.discriminator(data["hidden"], (data["labels"] != -100) & data["mask"])
    present = (((data["labels"] != -100) & data["mask"]).sum(-1) > 0)
    bce = -torch.nn.functional.logsigmoid(logits[:, 0]) - torch.nn.functional.logsigmoid(-logits[:, 1]) * present[:, 1]
    (0.5 * bce.sum()).backward()
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, msg=name)
    # and the value is the student's loss alone
    quality = torch.sigmoid(logits.detach())
    torch.testing.assert_close(
        value.detach(), qcrd_loss(data["student"], data["labels"], quality[:, 0], quality[:, 1], mask=data["mask"], reduction="sum")
    )
    assert set(module.last_losses) == {"nll", "contrast", "discriminator"}
    torch.testing.assert_close(module.last_losses["discriminator"], bce.detach().sum() / B)


def test_online_discriminator_learns_which_negatives_are_still_bad() -> None:
    """Trained jointly on pairs whose positives come from one distribution of states and whose
    negatives are half positive-like (a student that has become good) and half clearly different:
    the positive-like negatives end up with a much smaller weight 1 - s than the bad ones."""
    g = torch.Generator().manual_seed(8)
    n, t = 32, 5
    labels = torch.randint(0, V, (n, 2, t), generator=g)
    torch.manual_seed(8)
    module = QCRD(input_shapes={"student_hidden": (2, t, H)}, discriminator_hidden=16)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.02)
    shift = torch.zeros(H)
    shift[:3] = 2.0
    bad = torch.arange(n) >= n // 2
    for _ in range(150):
        hidden = torch.randn(n, 2, t, H, generator=g)
        hidden[bad, 1] += shift
        logits = torch.randn(n, 2, t, V, generator=g)
        optimizer.zero_grad()
        module(logits, hidden, labels).backward()
        optimizer.step()
    hidden = torch.randn(n, 2, t, H, generator=g)
    hidden[bad, 1] += shift
    quality = module.quality(hidden, labels)
    weight = 1.0 - quality[:, 1]
    # positives: 1 against the positive-like negatives' 0 in the same region, so s -> 2/3 there
    assert 0.55 < float(quality[:, 0].mean()) < 0.8
    assert float(weight[bad].mean()) > 0.8
    assert float(weight[~bad].mean()) < float(weight[bad].mean()) - 0.3


def test_warmup_keeps_weights_at_one_until_the_step() -> None:
    data = _pairs(9, scale=0.7)
    module = _module(warmup_steps=2)
    with torch.no_grad():
        module.discriminator.head[-1].weight.normal_(0, 1.0)
    unweighted = qcrd_loss(data["student"], data["labels"], mask=data["mask"])
    torch.testing.assert_close(module(data["student"], data["hidden"], data["labels"], mask=data["mask"]), unweighted)
    module.update(step=1, total_steps=10, value=0.0)
    torch.testing.assert_close(module(data["student"], data["hidden"], data["labels"], mask=data["mask"]), unweighted)
    module.update(step=2, total_steps=10, value=0.0)
    quality = module.quality(data["hidden"], data["labels"], mask=data["mask"])
    torch.testing.assert_close(
        module(data["student"], data["hidden"], data["labels"], mask=data["mask"]),
        qcrd_loss(data["student"], data["labels"], quality[:, 0], quality[:, 1], mask=data["mask"]),
    )
    restored = _module(warmup_steps=2)
    restored.load_state_dict(module.state_dict())
    assert int(restored.steps) == 2


# --- masking, reductions, accumulation ------------------------------------------------------------


def test_masked_positions_change_nothing() -> None:
    clean = _pairs(10, dtype=torch.float32, scale=0.7)
    counted = (clean["labels"] != -100) & clean["mask"]
    garbage = {k: v.clone() for k, v in clean.items()}
    garbage["student"][~counted] = 1e30
    garbage["hidden"][~counted] = 1e30
    results = []
    for data in (clean, garbage):
        torch.manual_seed(1)
        module = QCRD(input_shapes={"student_hidden": (2, T, H)})
        with torch.no_grad():
            module.discriminator.head[-1].weight.normal_(0, 1.0)
        student = data["student"].clone().requires_grad_(True)
        value = module(student, data["hidden"], data["labels"], mask=data["mask"])
        value.backward()
        results.append((value.detach(), student.grad, module.discriminator.head[0].weight.grad))
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a, b)
    assert torch.all(results[1][1][~counted] == 0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_fully_masked_gives_zero(reduction: str) -> None:
    data = _pairs(11, dtype=torch.float32)
    module = QCRD(input_shapes={"student_hidden": (2, T, H)})
    student = data["student"].clone().requires_grad_(True)
    value = module(student, data["hidden"], data["labels"], mask=torch.zeros(B, 2, T, dtype=torch.bool), reduction=reduction)
    assert torch.all(value == 0)
    value.sum().backward()
    assert student.grad is None or torch.all(student.grad == 0)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in module.parameters())


def test_two_micro_batches_summed_over_total_pairs_equal_one_batch_mean() -> None:
    data = _pairs(12, scale=0.7)
    module = _module()
    with torch.no_grad():
        module.discriminator.head[-1].weight.normal_(0, 1.0)

    def gradients(value: torch.Tensor, student: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(value, [student, *module.parameters()]))

    student = data["student"].clone().requires_grad_(True)
    whole = module(student, data["hidden"], data["labels"], mask=data["mask"])
    whole_grads = gradients(whole, student)
    parts = [slice(0, 1), slice(1, B)]
    pairs = sum(count_pairs(data["labels"][p], data["mask"][p]) for p in parts)
    student = data["student"].clone().requires_grad_(True)
    accumulated = sum(
        module(student[p], data["hidden"][p], data["labels"][p], mask=data["mask"][p], reduction="sum") for p in parts
    ) / pairs
    torch.testing.assert_close(accumulated, whole)
    for a, b in zip(gradients(accumulated, student), whole_grads):
        torch.testing.assert_close(a, b)


def test_low_precision_and_extreme_inputs() -> None:
    module = QCRD(input_shapes={"student_hidden": (2, T, H)})
    data = _pairs(15, dtype=torch.bfloat16)
    value = module(data["student"], data["hidden"], data["labels"], mask=data["mask"])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    extreme = _pairs(15, dtype=torch.float32, scale=1e4)
    student = extreme["student"].clone().requires_grad_(True)
    value = module(student, extreme["hidden"] * 1e4, extreme["labels"], mask=extreme["mask"])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


# --- contract and errors --------------------------------------------------------------------------


def test_objective_builds_it_with_the_hidden_size_and_trains_its_parameters() -> None:
    assert LOSSES.get("qcrd").builder is QCRD and QCRD.unit == "sequence" and qcrd_loss.unit == "sequence"
    objective = Objective([Term("qcrd", "qcrd", params={"pooling": "mean"})], source_shapes={"student.last_hidden": (2, T, H)})
    term = objective.terms[0]
    assert term.sources == {"student_logits": "student.logits", "student_hidden": "student.last_hidden", "labels": "batch.labels"}
    assert objective.updatable == ["qcrd"]
    names = {name for name, _ in objective.named_parameters()}
    assert any("discriminator" in name for name in names)
    assert "losses.qcrd.steps" in objective.state_dict()
    data = _pairs(13, dtype=torch.float32)
    out = objective(
        {"student.logits": data["student"], "student.last_hidden": data["hidden"], "batch.labels": data["labels"]},
        mask=data["mask"], reduction="sum",
    )
    out.total.backward()
    assert all(p.grad is not None for p in objective.parameters())


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"input_shapes\['student_hidden'\].*\(2, T, H\)"):
        QCRD(input_shapes={})
    with pytest.raises(ValueError, match="contrast must be one of"):
        QCRD(input_shapes={"student_hidden": (2, T, H)}, contrast="triplet")
    with pytest.raises(ValueError, match="pooling must be one of"):
        QCRD(input_shapes={"student_hidden": (2, T, H)}, pooling="attention")
    data = _pairs(14)
    with pytest.raises(ValueError, match="one value per pair"):
        qcrd_loss(data["student"], data["labels"], data["quality"], None)
    with pytest.raises(ValueError, match="margin must be > 0"):
        qcrd_loss(data["student"], data["labels"], margin=0.0)
    module = _module()
    with pytest.raises(ValueError, match="student_hidden"):
        module(data["student"], data["hidden"][:, :, :-1], data["labels"])
