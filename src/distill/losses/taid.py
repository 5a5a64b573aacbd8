"""TAID: Temporally Adaptive Interpolated Distillation.

Reference: M. Shing, K. Misaki, H. Bao, S. Yokoi, T. Akiba, "TAID: Temporally Adaptive Interpolated
Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025 (arXiv 2501.16937);
official code: github.com/SakanaAI/TAID, ``src/distil_losses/taid.py``.

The student is trained towards an intermediate distribution that starts near its own prediction
and moves to the teacher's as the interpolation parameter ``t`` grows during training:

* target (the paper's ``p_t``; official ``compute_loss``): the softmax of the interpolation of
  the **logits**, with the student side detached::

      p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)

* loss: the paper's ``J = KL(p_t || q_theta)``, ``q_theta = softmax(z_s)``, per position. The
  official code evaluates the cross-entropy ``-sum p_t log q_theta`` (DistiLLM's ``forward_kl``), which differs
  from the KL by ``H(p_t)``: the same gradient (``p_t`` is detached), another value. ``form="kl"``
  (default) returns the KL, so a student equal to the teacher scores 0; ``form="cross_entropy"``
  returns the official code's value. The value matters beyond logging because it is what drives
  the adaptive update of ``t`` below.

* adaptive update of ``t`` (official ``update_t``; defaults ``t_start=0.4, t_end=1.0,
  alpha=5e-4, beta=0.99`` there, the scripts also use ``t_start=0.2``), after each optimizer step
  ``n`` with the step's loss value ``J_n``::

      first step:  J_prev <- J_1                      (t unchanged)
      then:        delta_n = (J_prev - J_n) / (J_prev + eps)              relative change, eps = 1e-15
                   m_n     = beta * m_{n-1} + (1 - beta) * delta_n        momentum, m_0 = 0
                   t_lin   = t_start + (t_end - t_start) * n / N          linear floor, N = total steps
                   t_{n+1} = min(t_end, max(t_lin, t_n + alpha * sigmoid(m_n) * (1 - t_n)))
                   J_prev <- J_n

  so ``t`` never falls behind the linear schedule, grows faster while the loss falls quickly, and
  is non-decreasing and within ``[t_start, t_end]``. ``adaptive=False`` uses ``t_lin`` alone.

Choices where the paper and code leave room (configurable where they are knobs):

* ``n`` is the number of optimizer steps done when :meth:`TAID.update` is called (the engine
  calls it after the step), so ``t_lin`` is the linear value for the step about to run; the
  official code evaluates it at the (0-based) step that has just run, one step earlier.
* A non-finite loss value leaves the state untouched (the official code would poison the
  momentum with NaN).
* ``temperature`` (default 1, as in TAID, which has none) divides the interpolated logits and
  the student's logits, and the loss is then multiplied by ``T^2`` as in :func:`hinton_kd`.
* The state (``t``, momentum, previous loss, number of updates) lives in float64 buffers, so it is
  checkpointed with the objective and a resumed run continues it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses._common import (
    as_float32,
    check_logits,
    check_temperature,
    reduce_rows,
    valid_mask,
    valid_rows,
)
from distill.losses.kd import kl_per_position
from distill.registry import LOSSES

FORMS: tuple[str, ...] = ("kl", "cross_entropy")


def _interpolated_logits(
    student_rows: torch.Tensor, teacher_rows: torch.Tensor, t: float | torch.Tensor
) -> torch.Tensor:
    """``(1 - t) * stopgrad(z_s) + t * z_t`` (both sides detached), in float32 (float64 kept)."""
    student = as_float32(student_rows.detach())
    teacher = as_float32(teacher_rows.detach()).to(student.dtype)
    if isinstance(t, torch.Tensor):
        t = t.detach().to(device=student.device, dtype=student.dtype)
    return (1.0 - t) * student + t * teacher


def _check_t(t: float | torch.Tensor) -> None:
    """Range check of a Python ``t``; a tensor ``t`` is not read back (no device sync every step)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"t must be a scalar, got shape {tuple(t.shape)}")
        return
    value = float(t)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {value}")


def taid_target(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    t: float | torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TAID's intermediate distribution ``p_t = softmax(((1 - t) stopgrad(z_s) + t z_t) / T)``.

    Logits ``[..., C]``; returns probabilities ``[..., C]`` (float32, float64 kept), detached.
    ``t = 0`` gives the (detached) student's distribution, ``t = 1`` the teacher's.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    _check_t(t)
    return F.softmax(_interpolated_logits(student_logits, teacher_logits, t) / temperature, dim=-1)


def taid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    t: float | torch.Tensor,
    temperature: float = 1.0,
    form: str = "kl",
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """TAID loss at a given ``t``: ``T^2 KL(p_t || softmax(z_s / T))`` per position.

    ``p_t`` is :func:`taid_target` (detached), so the gradient flows only through the student's
    ``q``: ``d/dz_s = T (q - p_t)`` per position. ``form="cross_entropy"`` returns
    ``-T^2 sum_c p_t log q`` instead (the official code's value; same gradient). See the module
    docstring for the paper and :mod:`distill.losses._common` for ``mask`` and ``reduction``.
    """
    check_logits(student_logits, teacher_logits)
    check_temperature(temperature)
    _check_t(t)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got '{form}'")
    leading_shape = student_logits.shape[:-1]
    mask = valid_mask(mask, leading_shape, student_logits.device)
    student_rows, teacher_rows = valid_rows(
        mask, student_logits, teacher_logits.detach(), leading_dims=len(leading_shape)
    )
    student_log_probs = F.log_softmax(as_float32(student_rows) / temperature, dim=-1)
    target_log_probs = F.log_softmax(_interpolated_logits(student_rows, teacher_rows, t) / temperature, dim=-1)
    if form == "kl":
        per_row = kl_per_position(target_log_probs, student_log_probs)
    else:
        per_row = -(target_log_probs.exp() * student_log_probs).sum(dim=-1)
    return reduce_rows(per_row * (temperature**2), mask, leading_shape, reduction)


@LOSSES.register(
    "taid",
    summary="TAID: KL(p_t || student) to a student-teacher logit interpolation with adaptive t (Shing et al. 2025).",
)
class TAID(torch.nn.Module):
    """Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025) as an objective term.

    ``forward(student_logits, teacher_logits)`` is :func:`taid_loss` at the current ``t`` (a
    buffer); :meth:`update` (called by the engine after every optimizer step with the term's
    value) moves ``t`` by the adaptive rule in the module docstring.

    Hyper-parameters: ``t_start`` (initial t, official default 0.4), ``t_end`` (final t, 1.0),
    ``alpha`` (step size of the adaptive increase, 5e-4), ``beta`` (momentum of the relative loss
    change, 0.99), ``adaptive`` (False: linear schedule only), ``temperature`` (1.0), ``form``
    (``"kl"`` or ``"cross_entropy"``, the value returned and fed to the update), ``eps`` (1e-15,
    in the relative change).
    """

    t: torch.Tensor
    momentum: torch.Tensor
    prev_loss: torch.Tensor
    updates: torch.Tensor

    def __init__(
        self,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
        temperature: float = 1.0,
        form: str = "kl",
        eps: float = 1e-15,
    ) -> None:
        super().__init__()
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {t_start}")
        if not 0.0 < t_end <= 1.0 or t_end < t_start:
            raise ValueError(f"t_end must be in (0, 1] and >= t_start ({t_start}), got {t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got '{form}'")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        check_temperature(temperature)
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.adaptive = bool(adaptive)
        self.temperature = float(temperature)
        self.form = form
        self.eps = float(eps)
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float64))
        self.register_buffer("momentum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("prev_loss", torch.zeros((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        return taid_loss(
            student_logits,
            teacher_logits,
            t=self.t,
            temperature=self.temperature,
            form=self.form,
            mask=mask,
            reduction=reduction,
        )

    def target(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The current intermediate distribution ``p_t`` (see :func:`taid_target`)."""
        return taid_target(student_logits, teacher_logits, self.t, temperature=self.temperature)

    def linear_t(self, step: int, total_steps: int) -> float:
        """The linear floor ``t_start + (t_end - t_start) * min(step / total_steps, 1)``."""
        progress = min(max(step, 0) / max(total_steps, 1), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    @torch.no_grad()
    def update(self, *, step: int, total_steps: int, value: float) -> None:
        """Advance ``t`` after optimizer step ``step`` (of ``total_steps``) whose loss was ``value``."""
        value = float(value)
        if not math.isfinite(value):
            return
        if int(self.updates) == 0:
            self.prev_loss.fill_(value)
            self.updates += 1
            return
        t = float(self.t)
        t_lin = self.linear_t(step, total_steps)
        if self.adaptive:
            prev = float(self.prev_loss)
            relative_change = (prev - value) / (prev + self.eps)
            momentum = self.beta * float(self.momentum) + (1.0 - self.beta) * relative_change
            sigmoid = 0.5 * (1.0 + math.tanh(0.5 * momentum))  # overflow-free logistic
            new_t = min(self.t_end, max(t_lin, t + self.alpha * sigmoid * (1.0 - t)))
            self.momentum.fill_(momentum)
        else:
            new_t = min(self.t_end, t_lin)
        self.t.fill_(new_t)
        self.prev_loss.fill_(value)
        self.updates += 1

    def extra_repr(self) -> str:
        return (
            f"t={float(self.t):.6f}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, "
            f"beta={self.beta}, adaptive={self.adaptive}, temperature={self.temperature}, form='{self.form}'"
        )
