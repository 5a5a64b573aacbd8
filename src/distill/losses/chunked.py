"""Token-level distillation losses fused with the output projection, computed in chunks of rows.

A language model's logits are ``[tokens, vocab]``: at 8192 tokens and a 49k vocabulary that is
1.6 GB in float32 for the student alone, and as much again for the teacher, their softmaxes and
the gradient. :func:`fused_linear_distill` never holds such a tensor whole. It takes the final
hidden states and output-projection (``lm_head``) weights of both models and walks the valid
token rows in chunks; for each chunk it

1. computes the student's and the teacher's logits (two matmuls),
2. evaluates the per-token loss on them and its gradient with respect to the student's logits
   in closed form (the same quantities as the dense functions of :mod:`distill.losses`, which
   the tests compare them with; ``closed_form=False`` differentiates those very functions with
   autograd instead), and
3. turns that gradient into the gradients of the student's hidden states and ``lm_head``
   weight (two more matmuls), accumulated in float32,

then goes on to the next chunk. The gradients are computed during the forward pass and stored
(``[tokens, hidden]`` plus ``[vocab, hidden]``), and the backward pass only scales them by the
incoming gradient: four matmuls per token in all, the floor of any exact method, and peak memory
of one chunk of logits instead of the whole. This is the scheme of Liger-Kernel's fused linear
losses (Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024), written
here with plain PyTorch operations.

What the time goes to, besides the four matmuls: the student's and teacher's logits and the
logit gradient live in three ``[chunk, vocab]`` buffers allocated once per call and reused by
every chunk (the matmuls write into them with ``out=``; a fresh 64 MB tensor per chunk costs as
much in page faults as a pass over it). With ``compile=True`` the chunk's closed form is one
``torch.compile`` kernel with a single parallel loop over the rows: for each row the maxima, the
sums of exponentials, the divergence's sums and the gradient are computed while the row is in
the core's cache, so the chunk's logits are read from memory once and its gradient written once,
with one ``exp`` per distribution and element and one ``log`` per element for a mixture
(generalized JSD, skew KLs). The normalization (``1 / num_valid``) is folded into that gradient,
so no pass over the stored gradients follows. Chunks hold at least 512 rows
(:func:`default_chunk_rows`): each chunk streams both weights through memory, and fewer rows
would make that, rather than the arithmetic, the cost.

Divergences (``divergence=``): ``forward_kl``, ``reverse_kl``, ``generalized_jsd`` (``beta``),
``skew_forward_kl`` / ``skew_reverse_kl`` (``alpha``), ``total_variation``, ``jensen_shannon``,
``hinton_kd`` and ``taid`` (TAID's interpolated target at ``t``), each with its keyword
parameters in ``params`` (``temperature`` included), exactly as the dense function of the same
name defines them. ``ce_weight`` fuses the cross-entropy with ``labels`` into the same pass:
the per-token value is ``kd_weight * divergence + ce_weight * CE``.

Which tokens count: ``mask`` (True = valid) and, when ``labels`` are given, ``labels !=
ignore_index``; the others are skipped before any matmul. Normalization (``reduction``):
``"batchmean"`` divides the sum over valid tokens by ``num_valid`` (the number of valid tokens
in the whole optimizer step, when gradient accumulation splits it into micro-batches: the
correct normalization, with which the accumulated gradient equals the large batch's) or, by
default, by this call's own count; ``"sum"`` returns the sum. Per-token values (``"none"``)
would need the per-token gradients kept until backward, which defeats the purpose: refused.

Dtypes: the matmuls run in the inputs' dtype (bfloat16 models stay in bfloat16 there); logits
and the loss are float32 (float64 kept); gradients are accumulated in float32 and returned in
the parameters' dtype. The teacher never gets gradient. A student ``lm_head`` tied to its input
embedding works: the weight's gradient from this loss is added by autograd to the embedding's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from distill.losses.divergences import (
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from distill.losses.kd import hinton_kd
from distill.losses.taid import taid_loss

DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "jensen_shannon": jensen_shannon,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "hinton_kd": hinton_kd,
    "taid": taid_loss,
}
"""The divergences :func:`fused_linear_distill` can fuse, by name (the dense function of each)."""

CHUNK_ELEMENTS = 1 << 24
"""Default chunk: about this many logits per chunk (64 MB in float32) ..."""

MIN_CHUNK_ROWS = 512
"""... but at least this many rows. Each chunk streams both ``lm_head`` weights and the weight
gradient through memory (``5 V H`` floats: 2.7 GB at a 152k vocabulary and hidden 896) whatever
its size, so a chunk must hold enough rows for its matmuls to outweigh that: measured on a
2-core Xeon at 4096 x 896 x 151936, the four matmuls in chunks of 110 rows (16M logits) take
1.38x as long as in chunks of 512, chunks of 256 1.12x, and chunks of 1024 the same as 512."""

MAX_CHUNK_ROWS = 4096

EAGER_BLOCK_ELEMENTS = 1 << 22
"""Eager (not compiled), the closed forms walk a chunk's rows in blocks of about this many logits
(16 MB in float32): their dozen elementwise temporaries are then the size of a block, not of a
chunk, so the eager peak memory stays near the compiled one (and glibc serves temporaries under
its 32 MB mmap threshold from memory already mapped instead of page-faulting fresh pages)."""


def default_chunk_rows(vocab: int, rows: int | None = None) -> int:
    """Rows per chunk: ``CHUNK_ELEMENTS / vocab`` within ``[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]``
    (341 -> 512 rows at a 49k vocabulary, 110 -> 512 at 152k, 4096 at 4k), then, given the
    number of ``rows`` to walk, evened out so that every chunk has the same size within one row
    (8000 rows in 512-row chunks: 16 chunks of 500, not 15 of 512 and one of 320)."""
    chunk = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1)))
    if rows:
        chunks = -(-rows // chunk)
        chunk = -(-rows // chunks)
    return chunk


def _chunk_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    divergence: Callable[..., torch.Tensor],
    params: Mapping[str, Any],
    kd_weight: float,
    ce_weight: float,
) -> torch.Tensor:
    """The summed per-token loss of one chunk of valid rows (the dense functions, reduction sum)."""
    value = student_logits.new_zeros(())
    if kd_weight:
        value = value + kd_weight * divergence(student_logits, teacher_logits, reduction="sum", **params)
    if ce_weight:
        value = value + ce_weight * F.cross_entropy(student_logits, labels, reduction="sum")
    return value


def _row_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, kept ``[R, 1]``."""
    return values.sum(dim=-1, keepdim=True)


def _normalizer(exp: torch.Tensor) -> torch.Tensor:
    """Row sums of the exponentials, ``[R, 1]``. Compiled, float32 rows are accumulated in
    float64: inductor sums a row in 16 float32 lanes one element after the other (3072 additions
    per lane at a 49k vocabulary), which leaves relative errors of about 1e-5 in the normalizer
    and so in every probability and gradient (``torch.softmax`` in float32 shows the same); eager
    sums are pairwise and need no help. The other row sums (a divergence's value, ``sum q g``)
    enter the result additively and keep float32."""
    if torch.compiler.is_compiling() and exp.dtype == torch.float32:
        return exp.sum(dim=-1, keepdim=True, dtype=torch.float64).to(torch.float32)
    return exp.sum(dim=-1, keepdim=True)


def _softmax(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax of ``logits / temperature`` in parts: ``(s, e, total, inverse)`` with ``s`` the
    scaled logits minus their row maximum, ``e = exp(s)``, ``total`` its row sum ``[R, 1]`` and
    ``inverse = 1 / total``; so ``probs = e * inverse`` and ``log_probs = s - log(total)``.

    Everything below is written with these parts: each element takes one ``exp`` per
    distribution (and one ``log`` for a mixture). Logs of row values (``log(total)``) only enter
    per-row results, never an element's expression: compiled, a per-row value inside an
    elementwise expression is either evaluated in a separate pass over all rows (which splits the
    one fused per-row loop) or recomputed for every vector of the row."""
    scaled = logits / temperature if temperature != 1.0 else logits
    shifted = scaled - scaled.amax(dim=-1, keepdim=True)
    exp = shifted.exp()
    total = _normalizer(exp)
    return shifted, exp, total, total.reciprocal()


def _through_softmax(q: torch.Tensor, grad_q: torch.Tensor) -> torch.Tensor:
    """d/da of a function of ``q = softmax(a)`` from its gradient ``grad_q``: ``q (g - sum q g)``."""
    return q * (grad_q - _row_sum(q * grad_q))


def _temperature(name: str, params: Mapping[str, Any]) -> float:
    return float(params.get("temperature", 4.0 if name == "hinton_kd" else 1.0))


def _divergence_value_and_grad(
    name: str,
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    params: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row value ``[R]`` and gradient ``[R, V]`` w.r.t. the student logits, in closed form.

    The same quantities as the dense functions of :data:`DIVERGENCES` (values clamped at 0 per
    KL, as there), computed without an autograd graph. ``q``/``p`` are the student's/teacher's
    probabilities at the temperature; ``log p - log q = (s_p - s_q) + c`` with the row constant
    ``c = log total_q - log total_p``, which is added to the row sums (``sum p (s_p - s_q + c) =
    sum p (s_p - s_q) + c``) and cancels from the gradients; a mixture ``m`` enters as ``log q -
    log m = s_q - log(total_q m)`` with ``total_q m`` a sum of the two exponentials (one ``log``
    per element; where both exponentials underflow to 0 the term's weight is 0 and it is set to
    0). ``student`` is :func:`_softmax` of the student logits at the temperature.
    """
    temperature = _temperature(name, params)
    s_q, e_q, total_q, inv_q = student
    if name == "taid":
        t = float(params["t"])
        s_p, e_p, total_p, inv_p = _softmax((1.0 - t) * student_logits + t * teacher_logits, temperature)
    else:
        s_p, e_p, total_p, inv_p = _softmax(teacher_logits, temperature)
    if name == "generalized_jsd":
        beta = float(params.get("beta", 0.5))
        if beta == 0.0:  # comparisons, not a lookup keyed by beta: compiled, they specialize on less
            name = "forward_kl"
        elif beta == 1.0:
            name = "reverse_kl"
    if name == "skew_forward_kl" and float(params.get("alpha", 0.1)) == 0.0:
        name = "forward_kl"  # the mixture is q itself
    if name == "skew_reverse_kl" and float(params.get("alpha", 0.1)) == 0.0:
        name = "reverse_kl"  # the mixture is p itself
    q = e_q * inv_q
    inv_t = 1.0 / temperature
    if name in ("forward_kl", "hinton_kd", "taid", "reverse_kl"):
        gap = s_p - s_q  # log p - log q - c
        shift = (torch.log(total_q) - torch.log(total_p)).squeeze(-1)  # c
        if name == "reverse_kl":  # KL(q || p) = -(sum q gap + c); gradient q (log q - log p - KL)
            mean_gap = _row_sum(e_q * gap) * inv_q
            return (-(mean_gap.squeeze(-1) + shift)).clamp_min(0.0), (-inv_t) * q * (gap - mean_gap)
        value = ((_row_sum(e_p * gap) * inv_p).squeeze(-1) + shift).clamp_min(0.0)
        grad = inv_t * (q - e_p * inv_p)
        if name != "forward_kl":  # T^2 KL: hinton_kd, and taid's "kl" form
            scale = temperature**2
            if name == "taid" and params.get("form", "kl") == "cross_entropy":
                value = torch.log(total_q).squeeze(-1) - (_row_sum(e_p * s_q) * inv_p).squeeze(-1)  # -sum p log q
            return value * scale, grad * scale
        return value, grad
    if name == "total_variation":
        diff = q - e_p * inv_p
        return 0.5 * _row_sum(diff.abs()).squeeze(-1), inv_t * _through_softmax(q, 0.5 * torch.sign(diff))
    if name in ("generalized_jsd", "jensen_shannon"):
        beta = float(params.get("beta", 0.5)) if name == "generalized_jsd" else 0.5
        mixture = (1.0 - beta) * e_q + (beta * total_q * inv_p) * e_p  # total_q * m
        log_q_over_m = torch.where(mixture > 0, s_q - torch.log(mixture), 0.0)
        kl_q = _row_sum(e_q * log_q_over_m) * inv_q  # KL(q || m), unclamped
        shift = (torch.log(total_q) - torch.log(total_p)).squeeze(-1)
        kl_p = (_row_sum(e_p * (log_q_over_m + (s_p - s_q))) * inv_p).squeeze(-1) + shift  # KL(p || m)
        value = beta * kl_p.clamp_min(0.0) + (1.0 - beta) * kl_q.squeeze(-1).clamp_min(0.0)
        return value, ((1.0 - beta) * inv_t) * q * (log_q_over_m - kl_q)
    if name == "skew_forward_kl":
        alpha = float(params.get("alpha", 0.1))
        mixture = alpha * e_p + ((1.0 - alpha) * total_p * inv_q) * e_q  # total_p * m
        positive = mixture > 0
        log_p_over_m = torch.where(positive, s_p - torch.log(mixture), 0.0)
        value = (_row_sum(e_p * log_p_over_m) * inv_p).squeeze(-1).clamp_min(0.0)
        p_over_m = torch.where(positive, e_p / mixture, 0.0)
        return value, inv_t * _through_softmax(q, -(1.0 - alpha) * p_over_m)
    if name == "skew_reverse_kl":
        alpha = float(params.get("alpha", 0.1))
        mixture = alpha * e_q + ((1.0 - alpha) * total_q * inv_p) * e_p  # total_q * m
        positive = mixture > 0
        log_q_over_m = torch.where(positive, s_q - torch.log(mixture), 0.0)
        value = (_row_sum(e_q * log_q_over_m) * inv_q).squeeze(-1).clamp_min(0.0)
        q_over_m = torch.where(positive, e_q / mixture, 0.0)
        return value, inv_t * _through_softmax(q, log_q_over_m - alpha * q_over_m)
    raise ValueError(f"no closed form for '{name}'")  # pragma: no cover - DIVERGENCES lists the names


@functools.lru_cache(maxsize=None)
def _compiled_chunk_value_and_grad() -> Callable[..., torch.Tensor]:
    return torch.compile(_chunk_value_and_grad, dynamic=True)


def _chunk_value_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    name: str,
    params: Mapping[str, Any],
    kd_weight: float,
    ce_weight: float,
) -> torch.Tensor:
    """Summed loss of a chunk (returned) and its gradient w.r.t. the student's logits (written
    into ``out``), in closed form. Compiled, this is one kernel with a single loop over the rows:
    each row's passes (maxima, sums of exponentials, the divergence's sums, the gradient) run
    while the row is in cache, and the chunk is read from memory once and the gradient written
    once."""
    compiling = torch.compiler.is_compiling()
    value = student_logits.new_zeros(())
    grad: torch.Tensor | None = None
    temperature = _temperature(name, params)
    student = _softmax(student_logits, temperature) if kd_weight else None
    if kd_weight:
        rows, grad_kd = _divergence_value_and_grad(name, student, student_logits, teacher_logits, params)
        value = value + kd_weight * rows.sum()
        grad = grad_kd * kd_weight
    if ce_weight:
        s, e, total, inverse = student if student is not None and temperature == 1.0 else _softmax(student_logits, 1.0)
        index = labels.unsqueeze(-1)
        if compiling:  # a comparison and a masked row sum: they fuse into the loop over each row
            one_hot = torch.arange(s.shape[-1], device=s.device) == index
            picked = _row_sum(torch.where(one_hot, s, 0.0)).squeeze(-1)
            grad_ce = e * inverse - one_hot.to(e.dtype)
        else:
            picked = s.gather(-1, index).squeeze(-1)
            grad_ce = (e * inverse).scatter_add_(-1, index, -torch.ones_like(index, dtype=e.dtype))
        value = value - ce_weight * (picked - torch.log(total.squeeze(-1))).sum()
        grad = grad_ce * ce_weight if grad is None else grad + grad_ce * ce_weight
    if grad is None:
        out.zero_()
    else:
        out.copy_(grad)
    return value


def _closed_form_chunk(
    setup: dict[str, Any], logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """The chunk's value, its logit gradient written into ``out``: compiled (one fused kernel)
    when asked and possible, else eager, in blocks of rows (:data:`EAGER_BLOCK_ELEMENTS`). A
    compiler failure falls back to eager once, with a warning."""
    if setup["compile"]:
        try:
            return _compiled_chunk_value_and_grad()(logits, teacher_logits, labels, out, *setup["closed_form"])
        except Exception as error:  # no C++ compiler, an unsupported backend, ...
            warnings.warn(f"fused_linear_distill: torch.compile failed ({type(error).__name__}: {error}); running eagerly")
            setup["compile"] = False
    block = max(1, EAGER_BLOCK_ELEMENTS // max(logits.shape[-1], 1))
    value = logits.new_zeros(())
    for start in range(0, logits.shape[0], block):
        rows = slice(start, start + block)
        block_labels = labels[rows] if labels is not None else None
        value = value + _chunk_value_and_grad(logits[rows], teacher_logits[rows], block_labels, out[rows], *setup["closed_form"])
    return value


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T + bias`` written into ``out`` (a reused buffer: no fresh allocation,
    so no page faults, per chunk). A matmul in another dtype (bfloat16) is cast into it."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype and (bias is None or bias.dtype == out.dtype):
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return out.copy_(F.linear(hidden, weight, bias))


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        setup: dict[str, Any],
    ) -> torch.Tensor:
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_grad = want_hidden or want_weight or want_bias
        rows = student_hidden.shape[0]
        accumulate = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
        # every row of grad_hidden is written by its chunk, and grad_weight by the first chunk's
        # matmul: no zero fill
        grad_hidden = torch.empty(student_hidden.shape, dtype=accumulate, device=student_hidden.device) if want_hidden else None
        grad_weight = torch.empty(student_weight.shape, dtype=accumulate, device=student_weight.device) if want_weight else None
        weight_written = False
        grad_bias = (
            torch.zeros(student_bias.shape, dtype=accumulate, device=student_bias.device)
            if want_bias and student_bias is not None
            else None
        )
        total = torch.zeros((), dtype=accumulate, device=student_hidden.device)
        step = max(1, min(setup["chunk_rows"], rows))
        vocab = student_weight.shape[0]
        # One buffer per [chunk, vocab] tensor, reused by every chunk: the matmuls write into
        # them and the closed form writes the gradient into the third, so no chunk allocates
        # (a fresh 64 MB tensor costs as much in page faults as a pass over it).
        student_buffer = torch.empty((step, vocab), dtype=accumulate, device=student_hidden.device)
        teacher_buffer = torch.empty((step, vocab), dtype=accumulate, device=student_hidden.device)
        grad_buffer = (
            torch.empty((step, vocab), dtype=accumulate, device=student_hidden.device)
            if need_grad and setup["closed_form"]
            else None
        )
        for start in range(0, rows, step):
            hidden = student_hidden[start : start + step]
            size = hidden.shape[0]
            logits = _project(hidden, student_weight, student_bias, student_buffer[:size])
            teacher_logits = _project(teacher_hidden[start : start + step], teacher_weight, teacher_bias, teacher_buffer[:size])
            chunk_labels = labels[start : start + step] if labels is not None else None
            if not need_grad:
                total += _chunk_loss(logits, teacher_logits, chunk_labels, *setup["loss"]).detach()
                continue
            if grad_buffer is not None:
                grad_logits = grad_buffer[:size]
                value = _closed_form_chunk(setup, logits, teacher_logits, chunk_labels, grad_logits)
            else:
                logits = logits.detach().requires_grad_(True)
                with torch.enable_grad():
                    value = _chunk_loss(logits, teacher_logits, chunk_labels, *setup["loss"])
                (grad_logits,) = torch.autograd.grad(value, logits)
            total += value.detach()
            if grad_hidden is not None:
                if student_weight.dtype == accumulate:
                    torch.mm(grad_logits, student_weight, out=grad_hidden[start : start + step])
                else:
                    grad_hidden[start : start + step] = grad_logits.to(student_weight.dtype) @ student_weight
            if grad_weight is not None:
                if hidden.dtype == accumulate and weight_written:
                    grad_weight.addmm_(grad_logits.t(), hidden)
                elif hidden.dtype == accumulate:
                    torch.mm(grad_logits.t(), hidden, out=grad_weight)
                elif weight_written:
                    grad_weight += (grad_logits.t().to(hidden.dtype) @ hidden).to(accumulate)
                else:
                    grad_weight.copy_(grad_logits.t().to(hidden.dtype) @ hidden)
                weight_written = True
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, teacher_logits, grad_logits, value
        grad_buffer_used = grad_buffer is not None
        del student_buffer, teacher_buffer, grad_buffer
        if grad_weight is not None and not weight_written:  # no valid token
            grad_weight.zero_()
        # the closed form's weights carry the normalization already: no pass over its gradients
        scale = 1.0 if need_grad and grad_buffer_used else setup["scale"]
        ctx.grads = tuple(g.mul_(scale) if g is not None and scale != 1.0 else g for g in (grad_hidden, grad_weight, grad_bias))
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, student_bias.dtype if student_bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = []
        unit = bool(grad_output == 1)  # loss.backward(): the stored gradients as they are
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if grad is None else (grad if unit else grad * grad_output).to(dtype))
        return grads[0], grads[1], grads[2], None, None, None, None, None


def fused_linear_distill(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    params: Mapping[str, Any] | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_valid: int | float | None = None,
    chunk_rows: int | None = None,
    closed_form: bool = True,
    compile: bool = False,
) -> torch.Tensor:
    """Token-level distillation (and optionally cross-entropy) from hidden states and ``lm_head``
    weights, without materializing the ``[tokens, vocab]`` logits; see the module docstring.

    ``student_hidden`` ``[..., H_s]``, ``student_weight`` ``[V, H_s]``, ``teacher_hidden``
    ``[..., H_t]``, ``teacher_weight`` ``[V, H_t]``, ``labels`` and ``mask`` ``[...]``. Equals
    ``kd_weight * DIVERGENCES[divergence](z_s, z_t, **params) + ce_weight * CE(z_s, labels)`` with
    ``z = hidden @ weight.T + bias``, reduced over the valid tokens as ``reduction`` says.
    ``closed_form=False`` differentiates the dense function per chunk with autograd instead of
    the closed-form gradients (same result, about twice the elementwise work). ``compile=True``
    runs the closed-form chunk through ``torch.compile``, which fuses its elementwise passes
    (several times faster on a CPU; the first call compiles, for tens of seconds; a failure to
    compile falls back to eager with a warning).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{divergence}'; fused divergences: {', '.join(DIVERGENCES)}")
    if reduction not in ("batchmean", "sum"):
        raise ValueError(
            f"fused_linear_distill supports reduction 'batchmean' or 'sum', got '{reduction}' "
            "(per-token values would keep the whole gradient until backward)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) dims"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student and teacher lm_head weights have different vocabularies: {student_weight.shape[0]} vs "
            f"{teacher_weight.shape[0]} rows"
        )
    if student_weight.shape[1] != student_hidden.shape[-1] or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"lm_head weights [V, H] must match the hidden sizes: student {tuple(student_weight.shape)} vs "
            f"{student_hidden.shape[-1]}, teacher {tuple(teacher_weight.shape)} vs {teacher_hidden.shape[-1]}"
        )
    if ce_weight and labels is None:
        raise ValueError("ce_weight needs labels")
    leading = student_hidden.shape[:-1]
    valid = torch.ones(leading, dtype=torch.bool, device=student_hidden.device)
    if mask is not None:
        if tuple(mask.shape) != tuple(leading):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the hidden states' leading dims are {tuple(leading)}")
        valid &= mask.to(device=valid.device, dtype=torch.bool)
    if labels is not None:
        if tuple(labels.shape) != tuple(leading):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the hidden states' leading dims are {tuple(leading)}")
        valid &= labels.to(valid.device) != ignore_index
    index = valid.reshape(-1).nonzero().squeeze(1)
    count = int(index.numel())
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    label_rows = labels.reshape(-1).to(index.device) if labels is not None else None
    if count < valid.numel():  # drop the invalid rows (a copy; none when every token counts)
        student_rows, teacher_rows = student_rows.index_select(0, index), teacher_rows.index_select(0, index)
        label_rows = label_rows.index_select(0, index) if label_rows is not None else None
    if reduction == "sum":
        scale = 1.0
    else:
        denominator = float(num_valid) if num_valid is not None else float(count)
        if denominator <= 0 and count:
            raise ValueError(f"num_valid must be positive, got {num_valid}")
        scale = 1.0 / denominator if denominator > 0 else 0.0
    params = dict(params or {})
    closed = closed_form and not (divergence == "taid" and isinstance(params.get("t"), torch.Tensor))
    setup = {
        "chunk_rows": chunk_rows or default_chunk_rows(student_weight.shape[0], count),
        "loss": (DIVERGENCES[divergence], params, float(kd_weight), float(ce_weight)),
        # the closed form writes its gradients already normalized: no pass over them afterwards
        "closed_form": (divergence, params, float(kd_weight) * scale, float(ce_weight) * scale) if closed else None,
        "compile": bool(compile) and closed,
        "scale": scale,
    }
    if kd_weight:  # the dense function checks its parameters (and names a wrong one) on a tiny input
        probe = torch.zeros(1, 2)
        DIVERGENCES[divergence](probe, probe, **params)
    return _FusedLinearDistill.apply(
        student_rows,
        student_weight,
        student_bias,
        teacher_rows,
        teacher_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None,
        label_rows,
        setup,
    )
