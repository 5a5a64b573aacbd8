"""Token-level distillation losses fused with the output projection, computed in chunks of rows.

A language model's logits are ``[tokens, vocab]``: at 8192 tokens and a 49k vocabulary that is
1.6 GB in float32 for the student alone, and as much again for the teacher, their softmaxes and
the gradient. :func:`fused_linear_distill` never holds such a tensor whole. It takes the final
hidden states and output-projection (``lm_head``) weights of both models and walks the valid
token rows in chunks; for each chunk it

1. computes the student's and the teacher's logits (two matmuls),
2. evaluates the per-token loss on them with the very functions of :mod:`distill.losses`
   (so the value is, by construction, the dense loss) and its gradient with respect to the
   student's logits, and
3. turns that gradient into the gradients of the student's hidden states and ``lm_head``
   weight (two more matmuls), accumulated in float32,

then drops the chunk. The gradients are computed during the forward pass and stored (``[tokens,
hidden]`` plus ``[vocab, hidden]``), and the backward pass only scales them by the incoming
gradient: four matmuls per token in all, the floor of any exact method, and peak memory of one
chunk of logits instead of the whole. This is the scheme of Liger-Kernel's fused linear losses
(Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024), written here with
plain PyTorch operations.

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
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32
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
"""Default chunk: about this many logits per chunk (64 MB in float32), at least 16 rows: large
enough for efficient matmuls (341 rows at a 49k vocabulary), small beside the full logits."""


def default_chunk_rows(vocab: int) -> int:
    return max(16, min(4096, CHUNK_ELEMENTS // max(vocab, 1)))


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


def _softmax_parts(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax, softmax) of ``logits / temperature`` along the last dim."""
    scaled = logits / temperature if temperature != 1.0 else logits
    log_probs = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
    return log_probs, log_probs.exp()


def _through_softmax(q: torch.Tensor, grad_q: torch.Tensor) -> torch.Tensor:
    """d/da of a function of ``q = softmax(a)`` from its gradient ``grad_q``: ``q (g - sum q g)``."""
    return q * (grad_q - (q * grad_q).sum(dim=-1, keepdim=True))


def _divergence_value_and_grad(
    name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, params: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row value ``[R]`` and gradient ``[R, V]`` w.r.t. the student logits, in closed form.

    The same quantities as the dense functions of :data:`DIVERGENCES` (values clamped at 0 per
    KL, as there), computed without an autograd graph: about half the passes over the logits.
    """
    temperature = float(params.get("temperature", 4.0 if name == "hinton_kd" else 1.0))
    log_q, q = _softmax_parts(student_logits, temperature)
    if name == "taid":
        t = float(params["t"])
        target = (1.0 - t) * student_logits + t * teacher_logits
        log_p, p = _softmax_parts(target, temperature)
    else:
        log_p, p = _softmax_parts(teacher_logits, temperature)
    if name == "generalized_jsd":
        beta = float(params.get("beta", 0.5))
        name = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, name)
    if name in ("forward_kl", "hinton_kd", "taid"):
        value = (p * (log_p - log_q)).sum(-1).clamp_min(0.0)
        grad = (q - p) / temperature
        if name != "forward_kl":  # T^2 KL: hinton_kd, and taid's "kl" form
            scale = temperature**2
            if name == "taid" and params.get("form", "kl") == "cross_entropy":
                value = -(p * log_q).sum(-1)
            return value * scale, grad * scale
        return value, grad
    if name == "reverse_kl":
        raw = (q * (log_q - log_p)).sum(-1, keepdim=True)
        return raw.squeeze(-1).clamp_min(0.0), q * (log_q - log_p - raw) / temperature
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1), _through_softmax(q, 0.5 * torch.sign(q - p)) / temperature
    if name in ("generalized_jsd", "jensen_shannon"):
        beta = float(params.get("beta", 0.5)) if name == "generalized_jsd" else 0.5
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        value = beta * (p * (log_p - log_m)).sum(-1).clamp_min(0.0) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1).clamp_min(0.0)
        return value, _through_softmax(q, (1.0 - beta) * (log_q - log_m)) / temperature
    if name == "skew_forward_kl":
        alpha = float(params.get("alpha", 0.1))
        log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha)) if alpha else log_q
        value = (p * (log_p - log_m)).sum(-1).clamp_min(0.0)
        return value, _through_softmax(q, -(1.0 - alpha) * (log_p - log_m).exp()) / temperature
    if name == "skew_reverse_kl":
        alpha = float(params.get("alpha", 0.1))
        log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha)) if alpha else log_p
        value = (q * (log_q - log_m)).sum(-1).clamp_min(0.0)
        return value, _through_softmax(q, log_q - log_m - alpha * (log_q - log_m).exp()) / temperature
    raise ValueError(f"no closed form for '{name}'")  # pragma: no cover - DIVERGENCES lists the names


@functools.lru_cache(maxsize=None)
def _compiled_chunk_value_and_grad() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(_chunk_value_and_grad, dynamic=True)


def _chunk_value_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    name: str,
    params: Mapping[str, Any],
    kd_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of a chunk and its gradient w.r.t. the student's logits (closed forms)."""
    value = student_logits.new_zeros(())
    grad = torch.zeros_like(student_logits)
    if kd_weight:
        rows, grad_kd = _divergence_value_and_grad(name, student_logits, teacher_logits, params)
        value = value + kd_weight * rows.sum()
        grad.add_(grad_kd, alpha=kd_weight)
    if ce_weight:
        log_probs, probs = _softmax_parts(student_logits, 1.0)
        picked = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        value = value - ce_weight * picked.sum()
        probs.scatter_add_(-1, labels.unsqueeze(-1), -torch.ones_like(picked).unsqueeze(-1))
        grad.add_(probs, alpha=ce_weight)
    return value, grad


def _closed_form_chunk(
    setup: dict[str, Any], logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's value and logit gradient: compiled (fused elementwise passes) when asked and
    possible, else eager. A compiler failure falls back to eager once, with a warning."""
    if setup["compile"]:
        try:
            return _compiled_chunk_value_and_grad()(logits, teacher_logits, labels, *setup["closed_form"])
        except Exception as error:  # no C++ compiler, an unsupported backend, ...
            warnings.warn(f"fused_linear_distill: torch.compile failed ({type(error).__name__}: {error}); running eagerly")
            setup["compile"] = False
    return _chunk_value_and_grad(logits, teacher_logits, labels, *setup["closed_form"])


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
        grad_hidden = torch.zeros(student_hidden.shape, dtype=accumulate, device=student_hidden.device) if want_hidden else None
        grad_weight = torch.zeros(student_weight.shape, dtype=accumulate, device=student_weight.device) if want_weight else None
        grad_bias = (
            torch.zeros(student_bias.shape, dtype=accumulate, device=student_bias.device)
            if want_bias and student_bias is not None
            else None
        )
        total = torch.zeros((), dtype=accumulate, device=student_hidden.device)
        step = setup["chunk_rows"]
        for start in range(0, rows, step):
            hidden = student_hidden[start : start + step]
            logits = as_float32(F.linear(hidden, student_weight, student_bias))
            teacher_logits = as_float32(
                F.linear(teacher_hidden[start : start + step], teacher_weight, teacher_bias)
            ).to(logits.dtype)
            chunk_labels = labels[start : start + step] if labels is not None else None
            if not need_grad:
                total += _chunk_loss(logits, teacher_logits, chunk_labels, *setup["loss"]).detach()
                continue
            if setup["closed_form"]:
                value, grad_logits = _closed_form_chunk(setup, logits, teacher_logits, chunk_labels)
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
                if hidden.dtype == accumulate:
                    grad_weight.addmm_(grad_logits.t(), hidden)
                else:
                    grad_weight += (grad_logits.t().to(hidden.dtype) @ hidden).to(accumulate)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del logits, teacher_logits, grad_logits, value
        scale = setup["scale"]
        ctx.grads = tuple(g * scale if g is not None else None for g in (grad_hidden, grad_weight, grad_bias))
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, student_bias.dtype if student_bias is not None else None)
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            grads.append(None if grad is None else (grad * grad_output).to(dtype))
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
    student_rows = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, index)
    label_rows = labels.reshape(-1).to(index.device).index_select(0, index) if labels is not None else None
    count = int(index.numel())
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
        "chunk_rows": chunk_rows or default_chunk_rows(student_weight.shape[0]),
        "loss": (DIVERGENCES[divergence], params, float(kd_weight), float(ce_weight)),
        "closed_form": (divergence, params, float(kd_weight), float(ce_weight)) if closed else None,
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
