"""sparse_kd: divergences on a cached teacher top-k support (log-probs, ids, tail log-mass).

Checked against the dense divergences (k = V), an independent float64 loop over tokens, float64
gradcheck, masking with garbage, reductions, accumulated micro-batches, the defining properties
of each tail rule, bf16 input, and the registry.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import distill.losses  # noqa: F401  (registers the losses)
from distill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    total_variation,
)
from distill.losses.sparse import SPARSE_DIVERGENCES, TAIL_RULES, sparse_kd
from distill.objective import Objective, Term, hyperparameters, tensor_arguments
from distill.registry import LOSSES

RULES = list(TAIL_RULES)
# (divergence, beta): the generalized JSD at an inner beta and at its two endpoints
DIVERGENCES: list[tuple[str, float]] = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("generalized_jsd", 0.3),
    ("generalized_jsd", 0.0),
    ("generalized_jsd", 1.0),
    ("tvd", 0.5),
]
DENSE = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "tvd": total_variation}
div_ids = [f"{d}-b{b}" if d == "generalized_jsd" else d for d, b in DIVERGENCES]
divergences = pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=div_ids)
rules = pytest.mark.parametrize("rule", RULES)


pytestmark = pytest.mark.usefixtures("single_thread")


def dense(divergence: str, beta: float, student: torch.Tensor, teacher: torch.Tensor, **kw: Any) -> torch.Tensor:
    if divergence == "generalized_jsd":
        return generalized_jsd(student, teacher, beta=beta, **kw)
    return DENSE[divergence](student, teacher, **kw)


def top_k_cache(teacher_logits: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A cache of ``teacher_logits [..., V]``: top-k log-probs in a random order, their ids, the tail log-mass."""
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    ids = log_p.topk(k, dim=-1).indices
    order = torch.argsort(torch.rand(ids.shape, generator=generator, dtype=torch.float64), dim=-1)
    ids = ids.gather(-1, order)
    logprobs = log_p.gather(-1, ids)
    if k == teacher_logits.shape[-1]:
        tail = torch.full(teacher_logits.shape[:-1], float("-inf"), dtype=teacher_logits.dtype)
    else:
        tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return logprobs, ids, tail


def make_inputs(shape: tuple[int, ...], vocab: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * 2.5
    logprobs, ids, tail = top_k_cache(teacher, k, generator)
    labels = torch.randint(0, vocab, shape, generator=generator)
    return student.to(dtype), teacher.to(dtype), logprobs.to(dtype), ids, tail.to(dtype), labels


# --------------------------------------------------------------------------------------------
# 1. k == V: every rule is the dense loss of the same divergence


@divergences
@rules
def test_full_support_equals_the_dense_loss(divergence: str, beta: float, rule: str) -> None:
    vocab = 9
    student, teacher, logprobs, ids, tail, _ = make_inputs((3, 4), vocab, vocab, seed=1)
    assert torch.all(torch.isinf(tail)) and not torch.equal(ids[0, 0], torch.arange(vocab))  # a real permutation
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(5)) > 0.3
    for temperature in (1.0, 2.0):
        for reduction in ("sum", "batchmean", "none"):
            kw = {"temperature": temperature, "mask": mask, "reduction": reduction}
            s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
            ours = sparse_kd(s1, logprobs, ids, tail, divergence=divergence, tail=rule, beta=beta, **kw)
            theirs = dense(divergence, beta, s2, teacher, **kw)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
            ours.sum().backward()
            theirs.sum().backward()
            torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------
# 2. an independent float64 reference: plain Python loops over tokens, dicts over categories


def reference_divergence(P: dict[Any, float], Q: dict[Any, float], divergence: str, beta: float) -> float:
    if divergence == "generalized_jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "generalized_jsd" and beta == 1.0:
        divergence = "reverse_kl"
    total = 0.0
    for c in P:
        p, q = P[c], Q[c]
        if divergence == "forward_kl":
            total += p * math.log(p / q) if p > 0 else 0.0
        elif divergence == "reverse_kl":
            total += q * math.log(q / p) if p > 0 else 0.0  # a teacher zero drops the term
        elif divergence == "generalized_jsd":
            m = beta * p + (1 - beta) * q
            total += beta * p * math.log(p / m) if p > 0 else 0.0
            total += (1 - beta) * q * math.log(q / m) if q > 0 else 0.0
        else:
            total += 0.5 * abs(p - q)
    return total


def reference_token(
    z: list[float], lp: list[float], ids: list[int], tail: float, label: int, *,
    divergence: str, rule: str, temperature: float, beta: float, kd_weight: float, ce_weight: float,
) -> float:
    vocab = len(z)
    top = max(v / temperature for v in z)
    weights = [math.exp(v / temperature - top) for v in z]
    q = {i: w / sum(weights) for i, w in enumerate(weights)}
    scaled = {i: l / temperature for i, l in zip(ids, lp, strict=True)}
    if rule == "renormalize":
        top = max(scaled.values())
        e = {i: math.exp(v - top) for i, v in scaled.items()}
        P = {i: e[i] / sum(e.values()) for i in ids}
        on_s = sum(q[i] for i in ids)
        Q = {i: q[i] / on_s for i in ids}
    else:
        rest_scaled = tail / temperature
        top = max([*scaled.values(), rest_scaled])
        e = {i: math.exp(v - top) for i, v in scaled.items()}
        e_rest = math.exp(rest_scaled - top)  # 0.0 for a -inf tail
        normalizer = sum(e.values()) + e_rest
        P = {i: e[i] / normalizer for i in ids}
        Q = {i: q[i] for i in ids}
        if rule == "bucket":
            P["rest"] = e_rest / normalizer
            Q["rest"] = sum(q[o] for o in range(vocab) if o not in set(ids))  # summed directly, no log1mexp
    value = reference_divergence(P, Q, divergence, beta)
    is_kl = divergence in ("forward_kl", "reverse_kl") or (divergence == "generalized_jsd" and beta in (0.0, 1.0))
    if not (rule == "ignore" and is_kl):
        value = max(value, 0.0)
    top1 = max(z)
    ce = -(z[label] - top1 - math.log(sum(math.exp(v - top1) for v in z)))
    return kd_weight * value + ce_weight * ce


@divergences
@rules
def test_matches_an_independent_loop_reference(divergence: str, beta: float, rule: str) -> None:
    vocab, k = 13, 5
    student, _, logprobs, ids, tail, labels = make_inputs((3, 4), vocab, k, seed=2)
    # one position whose teacher has no mass outside S at all (tail -inf with k < V)
    logprobs[1, 2] = torch.log_softmax(logprobs[1, 2], dim=-1)
    tail[1, 2] = float("-inf")
    # one position with a large tail (mass 0.9 outside S)
    logprobs[2, 0] = torch.log_softmax(logprobs[2, 0], dim=-1) + math.log(0.1)
    tail[2, 0] = math.log(0.9)
    labels[0, 1] = -100
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2, 3] = False
    for temperature, kd_weight, ce_weight in ((1.0, 1.0, 0.0), (2.0, 0.7, 0.4), (0.6, 1.0, 0.0)):
        params = dict(divergence=divergence, tail=rule, temperature=temperature, beta=beta, kd_weight=kd_weight, ce_weight=ce_weight)
        ours = sparse_kd(student, logprobs, ids, tail, labels, mask=mask, reduction="none", **params)
        expected = torch.zeros(3, 4, dtype=torch.float64)
        for b in range(3):
            for t in range(4):
                if not mask[b, t] or labels[b, t] == -100:
                    continue
                expected[b, t] = reference_token(
                    student[b, t].tolist(), logprobs[b, t].tolist(), ids[b, t].tolist(), float(tail[b, t]),
                    int(labels[b, t]), divergence=divergence, rule=rule, temperature=temperature, beta=beta,
                    kd_weight=kd_weight, ce_weight=ce_weight,
                )
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
        mean = sparse_kd(student, logprobs, ids, tail, labels, mask=mask, **params)
        assert float(mean) == pytest.approx(float(expected.sum()) / 10, rel=1e-9, abs=1e-12)  # 12 - 2 invalid


# --------------------------------------------------------------------------------------------
# 3. gradcheck


@divergences
@rules
def test_gradcheck_float64(divergence: str, beta: float, rule: str) -> None:
    vocab, k = 7, 3
    student, _, logprobs, ids, tail, labels = make_inputs((2, 3), vocab, k, seed=3)
    labels[0, 0] = -100
    mask = torch.tensor([[True, True, True], [True, False, True]])
    for temperature, ce_weight in ((1.0, 0.0), (1.5, 0.3)):
        for reduction in ("batchmean", "sum"):

            kw = dict(divergence=divergence, tail=rule, beta=beta, temperature=temperature, ce_weight=ce_weight)
            kw.update(mask=mask, reduction=reduction)

            def fn(s: torch.Tensor, kw: dict[str, Any] = kw) -> torch.Tensor:
                return sparse_kd(s, logprobs, ids, tail, labels, **kw)

            assert torch.autograd.gradcheck(fn, (student.clone().requires_grad_(True),))


# --------------------------------------------------------------------------------------------
# 4. masking: garbage at invalid positions reaches neither the value nor the gradient


@divergences
@rules
def test_invalid_positions_hold_garbage(divergence: str, beta: float, rule: str) -> None:
    vocab, k = 10, 4
    student, _, logprobs, ids, tail, labels = make_inputs((3, 5), vocab, k, seed=4, dtype=torch.float32)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0] = True
    labels[0, 0] = -100  # not a target: invalid even though the mask says valid
    invalid = ~mask | (labels == -100)
    params = dict(divergence=divergence, tail=rule, beta=beta, temperature=2.0, ce_weight=0.5)
    clean = student.clone().requires_grad_(True)
    value = sparse_kd(clean, logprobs, ids, tail, labels, mask=mask, **params)
    value.backward()
    dirty_student, dirty_lp, dirty_ids, dirty_tail = student.clone(), logprobs.clone(), ids.clone(), tail.clone()
    dirty_student[invalid] = float("inf")
    dirty_student[0, 0, 0] = float("nan")
    dirty_lp[invalid] = float("nan")
    dirty_lp[0, 0, 1] = float("-inf")
    dirty_ids[invalid] = torch.randint(-50, 50, dirty_ids[invalid].shape)  # out of range, repeated
    dirty_tail[invalid] = float("-inf")
    dirty_tail[0, 0] = float("nan")
    dirty_student.requires_grad_(True)
    dirty = sparse_kd(dirty_student, dirty_lp, dirty_ids, dirty_tail, labels, mask=mask, **params)
    dirty.backward()
    torch.testing.assert_close(dirty, value)
    assert torch.isfinite(dirty) and torch.isfinite(dirty_student.grad).all()
    assert torch.all(dirty_student.grad[invalid] == 0)
    torch.testing.assert_close(dirty_student.grad, clean.grad)
    assert clean.grad[~invalid].abs().sum() > 0
    # fully masked: exact 0 and a zero gradient
    for reduction in ("batchmean", "sum", "none"):
        s = dirty_student.detach().clone().requires_grad_(True)
        nothing = sparse_kd(s, dirty_lp, dirty_ids, dirty_tail, labels, mask=torch.zeros(3, 5, dtype=torch.bool), reduction=reduction, **params)
        nothing.sum().backward()
        assert torch.all(nothing.detach() == 0) and torch.all(s.grad == 0)


def test_zero_teacher_mass_gives_no_nan() -> None:
    """A -inf teacher tail with k < V, and a -inf cached log-prob inside S: finite values and gradients."""
    vocab, k = 8, 4
    student, _, logprobs, ids, tail, _ = make_inputs((2, 3), vocab, k, seed=6, dtype=torch.float32)
    logprobs[0, 0] = torch.log_softmax(logprobs[0, 0], dim=-1)
    tail[0, 0] = float("-inf")
    logprobs[1, 1, 2] = float("-inf")
    for rule in RULES:
        for divergence, beta in DIVERGENCES:
            s = student.clone().requires_grad_(True)
            value = sparse_kd(s, logprobs, ids, tail, divergence=divergence, tail=rule, beta=beta, temperature=1.7, reduction="none")
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(s.grad).all(), (rule, divergence)


# --------------------------------------------------------------------------------------------
# 5. reductions


@rules
def test_reductions_agree(rule: str) -> None:
    vocab, k = 11, 4
    student, _, logprobs, ids, tail, labels = make_inputs((3, 6), vocab, k, seed=7)
    labels[1, :4] = -100
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.2
    count = int((mask & (labels != -100)).sum())
    for divergence, beta in DIVERGENCES:
        kw = dict(divergence=divergence, tail=rule, beta=beta, temperature=1.3, ce_weight=0.2, mask=mask)
        total = sparse_kd(student, logprobs, ids, tail, labels, reduction="sum", **kw)
        mean = sparse_kd(student, logprobs, ids, tail, labels, reduction="batchmean", **kw)
        none = sparse_kd(student, logprobs, ids, tail, labels, reduction="none", **kw)
        assert none.shape == (3, 6) and torch.all(none[~mask | (labels == -100)] == 0)
        torch.testing.assert_close(total, mean * count, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(none.sum(), total, rtol=1e-12, atol=1e-12)
        # [N, V] rows give the same per-position values
        flat = sparse_kd(
            student.reshape(18, vocab), logprobs.reshape(18, k), ids.reshape(18, k), tail.reshape(18),
            labels.reshape(18), reduction="none", **{**kw, "mask": mask.reshape(18)},
        )
        torch.testing.assert_close(flat, none.reshape(18), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# 6. accumulated micro-batches


@divergences
@rules
def test_accumulated_micro_batches_equal_the_whole_batch(divergence: str, beta: float, rule: str) -> None:
    vocab, k = 12, 5
    student, _, logprobs, ids, tail, labels = make_inputs((2, 8), vocab, k, seed=8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :7] = True  # 7 valid tokens in the first half, minus one unlabeled
    mask[1, :2] = True  # 2 in the second
    labels[0, 3] = -100
    valid_total = int((mask & (labels != -100)).sum())
    kw = dict(divergence=divergence, tail=rule, beta=beta, temperature=2.0, ce_weight=0.3)
    whole = student.clone().requires_grad_(True)
    sparse_kd(whole, logprobs, ids, tail, labels, mask=mask, **kw).backward()
    parts = student.clone().requires_grad_(True)
    for half in (slice(0, 1), slice(1, 2)):
        part = sparse_kd(parts[half], logprobs[half], ids[half], tail[half], labels[half], mask=mask[half], reduction="sum", **kw)
        (part / valid_total).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# 7. defining properties


def matched_student(teacher_logits: torch.Tensor, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Student logits whose softmax equals the teacher on S and puts the teacher's rest mass
    outside S in a different shape than the teacher's."""
    p = torch.softmax(teacher_logits, dim=-1)
    on_s = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    rest = p.masked_fill(on_s, 0).sum(-1, keepdim=True)
    other = torch.rand(p.shape, generator=generator, dtype=p.dtype).masked_fill(on_s, 0)
    other = other / other.sum(-1, keepdim=True) * rest
    return torch.where(on_s, p, other).log()


def test_zero_at_the_teacher_and_positive_elsewhere() -> None:
    vocab, k = 10, 4
    generator = torch.Generator().manual_seed(9)
    teacher = torch.randn(3, 5, vocab, generator=generator, dtype=torch.float64) * 2
    logprobs, ids, tail = top_k_cache(teacher, k, generator)
    student = matched_student(teacher, ids, generator)
    # a student that matches the teacher only up to a constant on S
    shifted = student.clone().scatter_add(-1, ids, torch.full(ids.shape, 0.7, dtype=torch.float64))
    perturbed = student + 0.3 * torch.randn(student.shape, generator=generator, dtype=torch.float64)
    for temperature in (1.0, 1.8):
        for rule in RULES:
            for divergence, beta in DIVERGENCES:
                kw = dict(divergence=divergence, tail=rule, beta=beta, reduction="none")
                if temperature == 1.0 or rule == "renormalize":  # else the tempered rest is an approximation
                    same = sparse_kd(student, logprobs, ids, tail, temperature=temperature, **kw)
                    assert same.abs().max() <= 1e-12, (rule, divergence, temperature)
                other = sparse_kd(perturbed, logprobs, ids, tail, temperature=temperature, **kw)
                is_kl = divergence != "tvd" and not (divergence == "generalized_jsd" and 0 < beta < 1)
                if rule != "ignore" or not is_kl:
                    assert torch.all(other > 1e-6), (rule, divergence, temperature)
                moved = sparse_kd(shifted, logprobs, ids, tail, temperature=temperature, **kw)
                if rule == "renormalize":  # sees only the shape of the student on S
                    assert moved.abs().max() <= 1e-12
                elif temperature == 1.0 and (rule != "ignore" or not is_kl):
                    assert torch.all(moved > 1e-6), (rule, divergence)


def test_ignore_forward_kl_is_not_a_divergence() -> None:
    """Zero at q = p on S, but lower (negative) at q = p / sum_S p: it pushes all mass onto S."""
    vocab, k = 10, 4
    generator = torch.Generator().manual_seed(10)
    teacher = torch.randn(2, vocab, generator=generator, dtype=torch.float64)
    logprobs, ids, tail = top_k_cache(teacher, k, generator)
    on_s = torch.full((2, vocab), -200.0, dtype=torch.float64).scatter(-1, ids, logprobs)  # q = p / sum_S p
    value = sparse_kd(on_s, logprobs, ids, tail, divergence="forward_kl", tail="ignore", reduction="none")
    kept = 1 - tail.exp()
    torch.testing.assert_close(value, kept * kept.log(), rtol=1e-12, atol=1e-12)
    assert torch.all(value < 0)
    same = sparse_kd(matched_student(teacher, ids, generator), logprobs, ids, tail, divergence="forward_kl", tail="ignore", reduction="none")
    assert same.abs().max() <= 1e-12


def test_bucket_pulls_mass_off_the_support_and_ignore_pushes_it_on() -> None:
    """A teacher with 60% of its mass outside S and a matched-on-S student with little mass
    outside: every bucket divergence raises an off-support logit (negative gradient); the
    ignore forward KL lowers it."""
    vocab, k = 12, 3
    generator = torch.Generator().manual_seed(11)
    logprobs = torch.log_softmax(torch.randn(1, k, generator=generator, dtype=torch.float64), -1) + math.log(0.4)
    ids = torch.tensor([[0, 5, 7]])
    tail = torch.tensor([math.log(0.6)], dtype=torch.float64)
    student = torch.full((1, vocab), -4.0, dtype=torch.float64).scatter(-1, ids, logprobs)
    off = [o for o in range(vocab) if o not in ids[0].tolist()]
    for divergence, beta in DIVERGENCES:
        s = student.clone().requires_grad_(True)
        sparse_kd(s, logprobs, ids, tail, divergence=divergence, tail="bucket", beta=beta).backward()
        assert torch.all(s.grad[0, off] < 0), divergence
    s = student.clone().requires_grad_(True)
    sparse_kd(s, logprobs, ids, tail, divergence="forward_kl", tail="ignore").backward()
    assert torch.all(s.grad[0, off] > 0)
    # float32, a student saturated on S (rest mass ~1e-10, below float32 resolution): the floored
    # rest mass keeps the value finite and the gradient still pulls mass off S
    saturated = torch.full((1, vocab), -30.0).scatter(-1, ids, logprobs.float()).requires_grad_(True)
    value = sparse_kd(saturated, logprobs.float(), ids, tail.float(), divergence="forward_kl", tail="bucket")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(saturated.grad).all()
    # q = p / 0.4 on S; q_rest floored at float32's eps
    floored = 0.4 * math.log(0.4) + 0.6 * (math.log(0.6) - math.log(torch.finfo(torch.float32).eps))
    assert float(value.detach()) == pytest.approx(floored, rel=1e-5)
    assert torch.all(saturated.grad[0, off] < 0)


# --------------------------------------------------------------------------------------------
# 8. bf16


def test_bf16_student_gives_a_float32_loss_close_to_float32() -> None:
    vocab, k = 50, 8
    student, _, logprobs, ids, tail, labels = make_inputs((4, 6), vocab, k, seed=12, dtype=torch.float32)
    low = student.bfloat16()
    for rule in RULES:
        for divergence, beta in DIVERGENCES:
            for temperature in (1.0, 2.0):
                kw = dict(divergence=divergence, tail=rule, beta=beta, temperature=temperature, ce_weight=0.2)
                s = low.clone().requires_grad_(True)
                value = sparse_kd(s, logprobs, ids, tail, labels, **kw)
                value.backward()
                assert value.dtype == torch.float32 and torch.isfinite(value)
                assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
                # same values upcast: the same float32 computation
                torch.testing.assert_close(value, sparse_kd(low.float(), logprobs, ids, tail, labels, **kw), rtol=1e-5, atol=1e-6)
                # and close to the unrounded float32 logits
                torch.testing.assert_close(value, sparse_kd(student, logprobs, ids, tail, labels, **kw), rtol=2e-2, atol=2e-3)
    extreme = (torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 1e4).requires_grad_(True)
    for rule in RULES:
        for divergence, beta in DIVERGENCES:
            value = sparse_kd(extreme, logprobs[0, :3], ids[0, :3], tail[0, :3], divergence=divergence, tail=rule, beta=beta)
            (grad,) = torch.autograd.grad(value, extreme)
            assert torch.isfinite(value) and torch.isfinite(grad).all(), (rule, divergence)


# --------------------------------------------------------------------------------------------
# 9. registry, objective, errors


def test_registered_and_usable_in_an_objective() -> None:
    entry = LOSSES.get("sparse_kd")
    assert entry.builder is sparse_kd
    assert tensor_arguments(sparse_kd) == (["student_logits", "teacher_logprobs", "teacher_ids", "teacher_tail"], ["labels"])
    assert set(hyperparameters(sparse_kd)) == {"divergence", "tail", "temperature", "beta", "ce_weight", "kd_weight"}
    # the teacher arguments read the cache's sources by default; the optional labels only when named
    term = Term("kd", "sparse_kd", params={"divergence": "generalized_jsd", "tail": "bucket", "ce_weight": 0.5}, inputs={"labels": "batch.labels"})
    assert term.sources == {
        "student_logits": "student.logits",
        "teacher_logprobs": "teacher.topk_logprobs",
        "teacher_ids": "teacher.topk_ids",
        "teacher_tail": "teacher.tail_logmass",
        "labels": "batch.labels",
    }
    assert "labels" not in Term("kd", "sparse_kd").sources
    student, _, logprobs, ids, tail, labels = make_inputs((2, 3), 9, 4, seed=13, dtype=torch.float32)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    sources = {
        "student.logits": student,
        "teacher.topk_logprobs": logprobs,
        "teacher.topk_ids": ids,
        "teacher.tail_logmass": tail,
        "batch.labels": labels,
    }
    out = Objective([term])(sources, mask=mask, reduction="sum")
    direct = sparse_kd(student, logprobs, ids, tail, labels, divergence="generalized_jsd", ce_weight=0.5, mask=mask, reduction="sum")
    torch.testing.assert_close(out.total, direct)


def test_bad_arguments_are_clear_errors() -> None:
    student, _, logprobs, ids, tail, labels = make_inputs((2, 3), 9, 4, seed=14, dtype=torch.float32)
    with pytest.raises(ValueError, match="divergence must be one of"):
        sparse_kd(student, logprobs, ids, tail, divergence="symmetric_kl")
    with pytest.raises(ValueError, match="tail must be one of"):
        sparse_kd(student, logprobs, ids, tail, tail="uniform")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sparse_kd(student, logprobs, ids, tail, temperature=0.0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        sparse_kd(student, logprobs, ids, tail, divergence="generalized_jsd", beta=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        sparse_kd(student, logprobs, ids, tail, ce_weight=1.0)
    with pytest.raises(ValueError, match="teacher_ids"):
        sparse_kd(student, logprobs, ids[..., :3], tail)
    with pytest.raises(ValueError, match="teacher_tail"):
        sparse_kd(student, logprobs, ids, tail[:, :2])
    with pytest.raises(ValueError, match="top-k size"):
        sparse_kd(student[..., :3], logprobs, ids, tail)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sparse_kd(student, logprobs, ids, tail, reduction="mean")
    assert set(SPARSE_DIVERGENCES) == {"forward_kl", "reverse_kl", "generalized_jsd", "tvd"}
