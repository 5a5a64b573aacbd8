"""The fused chunked loss equals the dense computation: values, gradients, masks, dtypes, accumulation."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from distill.losses.chunked import (
    DIVERGENCES,
    MIN_CHUNK_ROWS,
    default_chunk_rows,
    fused_linear_distill,
)

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


COMPILED_CASES = [
    ("forward_kl", {"temperature": 2.0}),
    ("reverse_kl", {"temperature": 1.5}),
    ("generalized_jsd", {"beta": 0.3}),
    ("total_variation", {}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("hinton_kd", {"temperature": 4.0}),
    ("taid", {"t": 0.4, "temperature": 2.0, "form": "cross_entropy"}),
]


@pytest.mark.parametrize(("divergence", "params"), COMPILED_CASES)
def test_the_compiled_chunk_equals_the_dense_loss_for_every_branch(divergence, params) -> None:
    """The compiled chunk is written differently from the eager one (logs of row sums on broadcast
    views, the label's one-hot as a comparison): float32 value and gradients within 1e-5 of the
    dense float64 loss, label cross-entropy fused, a last chunk shorter than the others."""
    sh, sw, sb, th, tw, labels, mask = _problem(dtype=torch.float64, tokens=(2, 24), hidden=(8, 8), vocab=64, seed=1)
    kwargs = {"divergence": divergence, "params": params, "kd_weight": 0.7, "ce_weight": 0.3}
    dense = _dense(sh, sw, sb, th, tw, labels, mask, divergence, params, 0.7, 0.3)
    expected = torch.autograd.grad(dense, (sh, sw, sb))
    inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in (sh, sw, sb)]
    with torch._dynamo.config.patch(recompile_limit=64), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fused_linear_distill(
            *inputs[:2], th.float(), tw.float(), labels, student_bias=inputs[2], mask=mask, chunk_rows=10, compile=True, **kwargs
        )
        grads = torch.autograd.grad(compiled, inputs)
    assert not [w for w in caught if "fused_linear_distill" in str(w.message)]  # compiled, no fallback
    torch.testing.assert_close(compiled.double(), dense, rtol=1e-5, atol=1e-7)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize(
    ("divergence", "params"),
    [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.5}), ("skew_forward_kl", {"alpha": 0.1}),
     ("skew_reverse_kl", {"alpha": 0.1})],
)
def test_extreme_logits_where_probabilities_underflow(divergence, params) -> None:
    """Logits hundreds apart: most probabilities underflow to 0 in float32. The closed forms stay
    finite and about as close to the float64 loss as the dense float32 loss is (the gradient is
    tiny and rounding-dominated there, for both)."""
    sh, sw, _, th, tw, _, mask = _problem(dtype=torch.float32, tokens=(2, 16), hidden=(6, 6), vocab=40, seed=2)
    sh, th = (sh.detach() * 60).requires_grad_(True), th * 60
    fused = fused_linear_distill(sh, sw, th, tw, mask=mask, divergence=divergence, params=params, chunk_rows=5)
    grads = torch.autograd.grad(fused, (sh, sw))
    dense = DIVERGENCES[divergence](F.linear(sh, sw), F.linear(th, tw), mask=mask, **params)
    dense_grads = torch.autograd.grad(dense, (sh, sw))
    sh64, sw64 = sh.detach().double().requires_grad_(True), sw.detach().double().requires_grad_(True)
    exact = DIVERGENCES[divergence](F.linear(sh64, sw64), F.linear(th.double(), tw.double()), mask=mask, **params)
    exact_grads = torch.autograd.grad(exact, (sh64, sw64))
    assert torch.isfinite(fused) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(fused.double(), exact, rtol=1e-5, atol=0)
    for got, dense_got, want in zip(grads, dense_grads, exact_grads):
        error, dense_error = ((g.double() - want).abs().max() / want.abs().max() for g in (got, dense_got))
        assert error <= 3 * dense_error + 1e-6, (float(error), float(dense_error))


@pytest.mark.parametrize(
    ("divergence", "params"),
    [("reverse_kl", {"temperature": 1.5}), ("skew_forward_kl", {"alpha": 0.3}), ("skew_reverse_kl", {"alpha": 0.3}),
     ("total_variation", {}), ("hinton_kd", {"temperature": 2.0})],
)
def test_float64_gradcheck_of_every_closed_form(divergence, params) -> None:
    """Numerical gradients (TAID is left out: its target is detached by definition)."""
    sh, sw, sb, th, tw, labels, mask = _problem(tokens=(2, 5), vocab=7, seed=4)
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_distill(
            h, w, th, tw, labels, student_bias=b, mask=mask, divergence=divergence, params=params, ce_weight=0.5, chunk_rows=3,
        ),
        (sh, sw, sb),
    )


def test_an_outer_gradient_scales_the_stored_gradients() -> None:
    sh, sw, _, th, tw, labels, mask = _problem()
    fused = fused_linear_distill(sh, sw, th, tw, labels, mask=mask, divergence="generalized_jsd", ce_weight=0.5, chunk_rows=4)
    once = torch.autograd.grad(fused, (sh, sw), retain_graph=True)
    scaled = torch.autograd.grad(2.5 * fused, (sh, sw), retain_graph=True)
    again = torch.autograd.grad(fused, (sh, sw))  # the stored gradients are not modified by backward
    for a, b, c in zip(once, scaled, again):
        torch.testing.assert_close(b, 2.5 * a)
        torch.testing.assert_close(c, a)


@pytest.mark.parametrize("closed_form", [True, False])
def test_without_gradients_the_value_is_the_dense_loss(closed_form) -> None:
    sh, sw, sb, th, tw, labels, mask = _problem()
    kwargs = {"divergence": "generalized_jsd", "params": {"beta": 0.3}, "kd_weight": 0.7, "ce_weight": 0.3}
    with torch.no_grad():
        fused = fused_linear_distill(sh, sw, th, tw, labels, student_bias=sb, mask=mask, chunk_rows=4, closed_form=closed_form, **kwargs)
    dense = _dense(sh, sw, sb, th, tw, labels, mask, "generalized_jsd", {"beta": 0.3}, 0.7, 0.3)
    torch.testing.assert_close(fused, dense.detach(), rtol=1e-10, atol=1e-12)


def test_the_default_chunk_rule() -> None:
    assert MIN_CHUNK_ROWS == 512
    assert default_chunk_rows(49152) == 512  # 16M logits would be 341 rows: too few for the matmuls
    assert default_chunk_rows(151936) == 512
    assert default_chunk_rows(16384) == 1024  # 16M logits
    assert default_chunk_rows(1000) == 4096  # at most 4096 rows
    assert default_chunk_rows(49152, 8192) == 512
    assert default_chunk_rows(49152, 8000) == 500  # 16 even chunks instead of a short last one
    assert default_chunk_rows(49152, 513) == 257
    assert default_chunk_rows(49152, 100) == 100  # one chunk
    for rows in (1, 511, 512, 513, 1025, 4097, 9999):
        chunk = default_chunk_rows(49152, rows)
        count = -(-rows // chunk)
        last = rows - (count - 1) * chunk
        assert chunk <= 512 and count == -(-rows // 512)  # as few chunks as 512-row ones
        assert 0 < chunk - last + 1 <= count  # the last one is short by less than one row per chunk


def test_eager_blocks_of_rows_inside_a_chunk(monkeypatch) -> None:
    """Eager closed forms walk a chunk in blocks of rows: the same value and gradients."""
    from distill.losses import chunked

    sh, sw, sb, th, tw, labels, mask = _problem()
    kwargs = {"divergence": "generalized_jsd", "params": {"beta": 0.3}, "kd_weight": 0.7, "ce_weight": 0.3}
    whole = fused_linear_distill(sh, sw, th, tw, labels, student_bias=sb, mask=mask, chunk_rows=8, **kwargs)
    monkeypatch.setattr(chunked, "EAGER_BLOCK_ELEMENTS", 3 * sw.shape[0])  # 3 rows per block, 8 per chunk
    blocks = fused_linear_distill(sh, sw, th, tw, labels, student_bias=sb, mask=mask, chunk_rows=8, **kwargs)
    torch.testing.assert_close(blocks, whole, rtol=1e-12, atol=1e-14)
    for got, want in zip(torch.autograd.grad(blocks, (sh, sw, sb)), torch.autograd.grad(whole, (sh, sw, sb))):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
