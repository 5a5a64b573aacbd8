"""The fused chunked loss equals the dense computation: values, gradients, masks, dtypes, accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from distill.losses.chunked import DIVERGENCES, fused_linear_distill

CASES = [
    ("forward_kl", {}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0, "temperature": 2.0}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("taid", {"t": 0.7, "temperature": 2.0, "form": "cross_entropy"}),
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {"temperature": 1.5}),
    ("generalized_jsd", {"beta": 0.3}),
    ("jensen_shannon", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("total_variation", {}),
    ("hinton_kd", {"temperature": 4.0}),
    ("taid", {"t": 0.4, "temperature": 1.0}),
]


def _problem(dtype=torch.float64, tokens=(3, 7), hidden=(5, 6), vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(*tokens, hidden[0], generator=g, dtype=dtype).requires_grad_(True)
    sw = (torch.randn(vocab, hidden[0], generator=g, dtype=dtype) * 0.7).requires_grad_(True)
    sb = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_(True)
    th = torch.randn(*tokens, hidden[1], generator=g, dtype=dtype)
    tw = torch.randn(vocab, hidden[1], generator=g, dtype=dtype) * 0.7
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels[0, :2] = -100  # a prompt
    mask = torch.rand(*tokens, generator=g) > 0.2
    return sh, sw, sb, th, tw, labels, mask


def _dense(sh, sw, sb, th, tw, labels, mask, divergence, params, kd_weight, ce_weight):
    zs, zt = F.linear(sh, sw, sb), F.linear(th, tw)
    valid = mask & (labels != -100)
    value = kd_weight * DIVERGENCES[divergence](zs, zt, mask=valid, reduction="sum", **params)
    value = value + ce_weight * F.cross_entropy(zs[valid], labels[valid], reduction="sum")
    return value / valid.sum()


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize(("divergence", "params"), CASES)
def test_value_and_gradients_equal_the_dense_loss(divergence, params, closed_form) -> None:
    sh, sw, sb, th, tw, labels, mask = _problem()
    kwargs = {"divergence": divergence, "params": params, "kd_weight": 0.7, "ce_weight": 0.3, "closed_form": closed_form}
    fused = fused_linear_distill(sh, sw, th, tw, labels, student_bias=sb, mask=mask, chunk_rows=4, **kwargs)
    grads = torch.autograd.grad(fused, (sh, sw, sb))
    dense = _dense(sh, sw, sb, th, tw, labels, mask, divergence, params, 0.7, 0.3)
    expected = torch.autograd.grad(dense, (sh, sw, sb))
    torch.testing.assert_close(fused, dense, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_float64_gradcheck_through_every_chunking() -> None:
    sh, sw, sb, th, tw, labels, mask = _problem(tokens=(2, 5), vocab=7)
    for rows in (1, 3, 100):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_distill(
                h, w, th, tw, labels, student_bias=b, mask=mask, divergence="generalized_jsd",
                params={"beta": 0.4, "temperature": 2.0}, ce_weight=0.5, chunk_rows=rows,
            ),
            (sh, sw, sb),
        )


def test_float32_matches_the_dense_loss_to_1e5_and_the_teacher_gets_nothing() -> None:
    sh, sw, sb, th, tw, labels, mask = _problem(dtype=torch.float32, tokens=(4, 64), hidden=(32, 48), vocab=500)
    tw.requires_grad_(True)
    th.requires_grad_(True)
    fused = fused_linear_distill(sh, sw, th, tw, labels, mask=mask, divergence="reverse_kl", ce_weight=1.0, chunk_rows=37)
    fused.backward()
    dense = _dense(sh.detach(), sw.detach().requires_grad_(True), None, th.detach(), tw.detach(), labels, mask, "reverse_kl", {}, 1.0, 1.0)
    torch.testing.assert_close(fused.detach(), dense.detach(), rtol=1e-5, atol=0)
    assert tw.grad is None and th.grad is None


def test_accumulation_normalized_by_the_steps_valid_tokens() -> None:
    sh, sw, sb, th, tw, labels, mask = _problem(tokens=(4, 6))
    labels[1, :5] = -100  # micro-batches with uneven numbers of valid tokens
    whole = fused_linear_distill(sh, sw, th, tw, labels, mask=mask, ce_weight=1.0)
    grads_whole = torch.autograd.grad(whole, (sh, sw))
    total = int((mask & (labels != -100)).sum())
    parts = [
        fused_linear_distill(sh[i : i + 2], sw, th[i : i + 2], tw, labels[i : i + 2], mask=mask[i : i + 2], ce_weight=1.0, num_valid=total)
        for i in (0, 2)
    ]
    assert int((mask[:2] & (labels[:2] != -100)).sum()) != int((mask[2:] & (labels[2:] != -100)).sum())
    torch.testing.assert_close(parts[0] + parts[1], whole)
    grads_parts = torch.autograd.grad(parts[0] + parts[1], (sh, sw))
    for got, want in zip(grads_parts, grads_whole):
        torch.testing.assert_close(got, want)


def test_tied_embeddings_get_both_gradients() -> None:
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(13, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, 13, (2, 5), generator=g)
    teacher_hidden, teacher_weight = torch.randn(2, 5, 6, generator=g, dtype=torch.float64), torch.randn(13, 6, generator=g, dtype=torch.float64)

    def student_hidden(weight):
        return torch.tanh(F.embedding(ids, weight) * 1.3)

    fused = fused_linear_distill(student_hidden(embedding), embedding, teacher_hidden, teacher_weight, chunk_rows=3)
    dense = F.kl_div(
        F.log_softmax(F.linear(student_hidden(embedding), embedding), -1),
        F.log_softmax(F.linear(teacher_hidden, teacher_weight), -1), log_target=True, reduction="sum",
    ) / 10
    torch.testing.assert_close(fused, dense)
    torch.testing.assert_close(torch.autograd.grad(fused, embedding)[0], torch.autograd.grad(dense, embedding)[0])


def test_bfloat16_models_give_a_float32_loss_close_to_float32() -> None:
    sh, sw, _, th, tw, labels, mask = _problem(dtype=torch.float32, tokens=(2, 32), hidden=(32, 32), vocab=256)
    reference = fused_linear_distill(sh, sw, th, tw, labels, mask=mask)
    low = fused_linear_distill(
        sh.detach().bfloat16().requires_grad_(True), sw.detach().bfloat16().requires_grad_(True), th.bfloat16(), tw.bfloat16(),
        labels, mask=mask,
    )
    assert low.dtype == torch.float32
    assert abs(float(low.detach()) - float(reference.detach())) / float(reference.detach()) < 0.02
    low.backward()


def test_fully_masked_and_bad_input() -> None:
    sh, sw, sb, th, tw, labels, mask = _problem()
    nothing = fused_linear_distill(sh, sw, th, tw, labels, mask=torch.zeros_like(mask))
    assert float(nothing.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(nothing, sw)[0], torch.zeros_like(sw))
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        fused_linear_distill(sh, sw, th, tw, divergence="kl")
    with pytest.raises(ValueError, match="reduction 'batchmean' or 'sum'"):
        fused_linear_distill(sh, sw, th, tw, reduction="none")
    with pytest.raises(ValueError, match="different vocabularies: 11 vs 12"):
        fused_linear_distill(sh, sw, th, torch.randn(12, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta must be in"):
        fused_linear_distill(sh, sw, th, tw, divergence="generalized_jsd", params={"beta": 1.5})
    with pytest.raises(TypeError, match="beta"):
        fused_linear_distill(sh, sw, th, tw, divergence="forward_kl", params={"beta": 0.5})
    with pytest.raises(ValueError, match="ce_weight needs labels"):
        fused_linear_distill(sh, sw, th, tw, ce_weight=1.0)


@pytest.mark.parametrize(("beta", "temperature"), [(0.3, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 1.0)])
def test_equals_liger_kernels_fused_linear_jsd(beta, temperature) -> None:
    jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss")
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(40, 16, generator=g).requires_grad_(True)
    sw = torch.randn(50, 16, generator=g).requires_grad_(True)
    th, tw = torch.randn(40, 12, generator=g), torch.randn(50, 12, generator=g)
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[:7] = -100
    liger = jsd.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature, compiled=False, chunk_size=8
    )
    expected = liger(sh, sw, th, tw, labels)
    ours = fused_linear_distill(sh, sw, th, tw, labels, divergence="generalized_jsd", params={"beta": beta, "temperature": temperature})
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(ours, (sh, sw)), torch.autograd.grad(expected, (sh, sw))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_compiled_chunk_equals_the_eager_one() -> None:
    sh, sw, sb, th, tw, labels, mask = _problem(dtype=torch.float32, tokens=(2, 24), hidden=(8, 8), vocab=64)
    kwargs = {"divergence": "forward_kl", "params": {"temperature": 2.0}, "ce_weight": 0.5, "mask": mask, "chunk_rows": 10}
    eager = fused_linear_distill(sh, sw, th, tw, labels, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fused_linear_distill(sh, sw, th, tw, labels, compile=True, **kwargs)
    assert not [w for w in caught if "fused_linear_distill" in str(w.message)]  # compiled, no fallback
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(compiled, (sh, sw)), torch.autograd.grad(eager, (sh, sw))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
