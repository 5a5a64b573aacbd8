"""KDRL: GRPO and reverse-KL knowledge distillation in one on-policy objective.

References:

* H. Xu, Q. Zhu, H. Deng, J. Li, L. Hou, Y. Wang, L. Shang, R. Xu, F. Mi, "KDRL: Post-Training
  Reasoning LLMs via Unified Knowledge Distillation and Reinforcement Learning", 2025
  (arXiv 2506.02208).
* Z. Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", 2024 (arXiv 2402.03300): GRPO, group-normalised advantages and a rule-based reward.
* J. Schulman, "Approximating KL Divergence", 2020 (joschu.net/blog/kl-approx.html): the ``k1``,
  ``k2``, ``k3`` single-sample estimators.

Setting. For each prompt the student samples a group of ``G`` responses ``o_i``; a rule-based
reward ``r_i`` scores them and GRPO's advantage is ``A_i = (r_i - mean(r)) / std(r)`` within the
group (:func:`distill.engine.rollout.group_rollout` produces the rows, rewards and advantages).
On those rows (``student_logits`` ``[..., T, V]``, ``teacher_logits`` the teacher on the same
tokens, ``labels`` ``[..., T]`` the sampled completion tokens as shifted targets, ``advantages``
and ``rewards`` ``[...]`` one per response), KDRL minimises per counted token ``t`` of response
``i`` (``pi`` the student, ``pi_T`` the teacher, ``o_t`` the sampled token)::

    l_t = rl_weight * pg_t  +  beta * m_i * kl_t

    pg_t = -A_i * rho_t                       rho_t = pi(o_t) / pi_old(o_t)
         = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)    with old log-probs (PPO clipping)
    kl_t : an estimate of KL(pi(.|s_t) || pi_T(.|s_t)) at the sampled token (below)
    m_i  : 1, or (reward-guided KD, kd_on="incorrect") 1 only if r_i < reward_threshold

and the reduction is GRPO's token-level normalisation: ``"batchmean"`` is the sum over every
counted token of every response divided by their number (DAPO's token-level loss; the paper's
GRPO objective, ``1 / sum_i |o_i| * sum_i sum_t``), ``"sum"`` is that sum, which the engine divides
by the number of counted tokens of the optimizer step. Without old log-probabilities (one update
per sample, on-policy) ``rho_t = exp(log pi - stopgrad(log pi)) = 1``: the value of ``pg_t`` is
``-A_i`` and its gradient ``-A_i grad log pi(o_t)``, REINFORCE with the group baseline.

KL estimators, with ``l = log pi(o_t) - log pi_T(o_t)`` at the sampled token (``o_t ~ pi``):

* ``"k2"`` (KDRL's choice): ``l^2 / 2``. Its gradient ``l grad log pi(o_t)`` is, in expectation
  over ``o_t ~ pi``, exactly the gradient of the token-level reverse KL (the paper's argument for
  it); its value is a biased estimate of the KL.
* ``"k3"`` (GRPO's KL term): ``exp(-l) - 1 + l``, an unbiased, non-negative estimate of the value
  of the KL; its gradient ``(1 - pi_T/pi) grad log pi`` is, in expectation, the gradient of the
  *forward* KL(pi_T || pi) instead. ``l`` is clamped to [-20, 20] inside ``exp`` (as verl does)
  so an extreme ratio cannot overflow.
* ``"full"``: the exact token-level ``sum_v pi(v) (log pi(v) - log pi_T(v))`` over the whole
  vocabulary (no sampling noise, one softmax of the teacher per token more memory).

Shared conventions of :mod:`distill.losses._common`: ``mask`` ``[..., T]``, counted positions
selected first, float32 (float64 kept), the teacher detached, advantages and rewards detached, a
fully masked input gives 0 and a zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.losses._common import as_float32, kl_rows, reduce_rows, valid_mask
from distill.registry import LOSSES

KL_ESTIMATORS: tuple[str, ...] = ("k2", "k3", "full")
KD_ON: tuple[str, ...] = ("all", "incorrect")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")
K3_LOG_RATIO_LIMIT = 20.0


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got '{value}'")


def _per_response(name: str, values: torch.Tensor | None, response_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    if values is None:
        return None
    if tuple(values.shape) != tuple(response_shape):
        raise ValueError(
            f"{name} has shape {tuple(values.shape)}; expected one value per response, {tuple(response_shape)} "
            "(the leading dims of labels without the token dim)"
        )
    return values.detach().to(device)


def _token_log_probs(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs -> (counted [..., T], student log-softmax rows [P, V], targets [P], log pi(o_t) [P])."""
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must have shape [..., T, V], got {tuple(student_logits.shape)}")
    leading_shape = student_logits.shape[:-1]
    if tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits' leading dims are {tuple(leading_shape)}")
    device = student_logits.device
    counted = labels.to(device) != ignore_index
    checked = valid_mask(mask, leading_shape, device)
    if checked is not None:
        counted = counted & checked
    targets = labels.to(device)[counted].long()
    vocabulary = student_logits.shape[-1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocabulary):
        raise ValueError(
            f"labels must lie in [0, {vocabulary}) or equal ignore_index ({ignore_index}); "
            f"got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    log_q = F.log_softmax(as_float32(student_logits[counted]), dim=-1)
    token = log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return counted, log_q, targets, token


def policy_gradient_rows(
    token_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    clip_eps: float,
) -> torch.Tensor:
    """GRPO's per-token surrogate ``-min(rho A, clip(rho, 1-eps, 1+eps) A)`` on rows ``[P]``.

    Without ``old_log_probs``: ``-A * exp(log pi - stopgrad(log pi))``, value ``-A``, gradient
    ``-A grad log pi`` (the on-policy single update, where the clip is inactive).
    """
    if old_log_probs is None:
        return -advantages * torch.exp(token_log_probs - token_log_probs.detach())
    ratio = torch.exp(token_log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def reverse_kl_rows(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    targets: torch.Tensor,
    estimator: str,
) -> torch.Tensor:
    """Per counted token, the ``estimator`` of ``KL(pi || pi_T)``: rows ``[P, V]`` of log-probs, sampled ``targets`` ``[P]``."""
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    if estimator == "full":
        return kl_rows(student_log_probs, teacher_log_probs)
    index = targets.unsqueeze(-1)
    log_ratio = (student_log_probs.gather(-1, index) - teacher_log_probs.gather(-1, index)).squeeze(-1)
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    limited = log_ratio.clamp(-K3_LOG_RATIO_LIMIT, K3_LOG_RATIO_LIMIT)
    return torch.exp(-limited) - 1.0 + limited


def _policy_rows(
    token_log_probs: torch.Tensor,
    counted: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    clip_eps: float,
) -> torch.Tensor:
    """:func:`policy_gradient_rows` of the counted tokens: ``advantages`` ``[...]`` (one per response)
    and ``old_logprobs`` ``[..., T]`` checked against ``counted`` ``[..., T]`` and gathered to rows ``[P]``."""
    leading_shape = counted.shape
    advantage = _per_response("advantages", advantages, leading_shape[:-1], counted.device)
    assert advantage is not None
    advantage_rows = advantage.to(token_log_probs.dtype).unsqueeze(-1).expand(leading_shape)[counted]
    old_rows = None
    if old_logprobs is not None:
        if tuple(old_logprobs.shape) != tuple(leading_shape):
            raise ValueError(f"old_logprobs have shape {tuple(old_logprobs.shape)}; expected {tuple(leading_shape)}")
        old_rows = old_logprobs.detach().to(device=counted.device, dtype=token_log_probs.dtype)[counted]
    return policy_gradient_rows(token_log_probs, advantage_rows, old_rows, clip_eps)


def _check_scalar_coefficient(name: str, value: float | torch.Tensor) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        return
    if not float(value) >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _kdrl_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor | None,
    rewards: torch.Tensor | None,
    old_logprobs: torch.Tensor | None,
    *,
    with_policy: bool,
    with_kl: bool,
    kl_estimator: str,
    kd_on: str,
    reward_threshold: float,
    clip_eps: float,
    ignore_index: int,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Size, torch.Tensor | None, torch.Tensor | None]:
    """(counted [..., T], leading shape, policy rows [P] or None, KL rows [P] or None; the KL already reward-masked)."""
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("kd_on", kd_on, KD_ON)
    if not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} must have the same shape"
        )
    counted, log_q, targets, token = _token_log_probs(student_logits, labels, mask, ignore_index)
    leading_shape = student_logits.shape[:-1]
    response_shape = leading_shape[:-1]
    device = student_logits.device
    policy = None
    if with_policy:
        if advantages is None:
            raise ValueError(
                "kdrl: the policy term (rl_weight > 0) needs advantages, one per response "
                "(in YAML: inputs.advantages: batch.advantages); set rl_weight: 0 for distillation alone"
            )
        policy = _policy_rows(token, counted, advantages, old_logprobs, clip_eps)
    kl = None
    if with_kl:
        teacher_rows = as_float32(teacher_logits.detach()[counted]).to(log_q.dtype)
        kl = reverse_kl_rows(log_q, F.log_softmax(teacher_rows, dim=-1), targets, kl_estimator)
        if kd_on == "incorrect":
            if rewards is None:
                raise ValueError(
                    "kdrl: kd_on='incorrect' needs the rewards, one per response (in YAML: inputs.rewards: batch.rewards)"
                )
            reward = _per_response("rewards", rewards, response_shape, device)
            assert reward is not None
            distilled = (reward < reward_threshold).unsqueeze(-1).expand(leading_shape)[counted]
            kl = torch.where(distilled, kl, torch.zeros_like(kl))
    return counted, leading_shape, policy, kl


def _combine(
    policy: torch.Tensor | None, kl: torch.Tensor | None, rl_weight: float, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """``rl_weight * policy + kl_coef * kl`` on rows ``[P]`` (at least one of the two is present)."""
    total = None if policy is None else rl_weight * policy
    if kl is not None:
        coefficient = kl_coef.detach().to(device=kl.device, dtype=kl.dtype) if isinstance(kl_coef, torch.Tensor) else float(kl_coef)
        total = coefficient * kl if total is None else total + coefficient * kl
    assert total is not None
    return total


def kdrl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    *,
    kl_coef: float | torch.Tensor = 1e-3,
    kl_estimator: str = "k2",
    kd_on: str = "all",
    reward_threshold: float = 1.0,
    clip_eps: float = 0.2,
    rl_weight: float = 1.0,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """KDRL's unified objective at a given KL coefficient (Xu et al., 2025; formula in the module docstring).

    Tensors: ``student_logits`` / ``teacher_logits`` ``[..., T, V]`` (sources ``student.logits``,
    ``teacher.logits``), ``labels`` ``[..., T]`` (``batch.labels``: the sampled completion tokens
    as shifted targets), ``advantages`` ``[...]`` (``batch.advantages``; needed when
    ``rl_weight > 0``), ``rewards`` ``[...]`` (``batch.rewards``; needed by
    ``kd_on="incorrect"``), ``old_logprobs`` ``[..., T]`` (optional: the sampling policy's
    log-probabilities of the labels, for PPO-style clipping over several updates per sample).

    Hyper-parameters:

    * ``kl_coef`` (``beta``; 1e-3, the floor of the paper's annealing; a float or a scalar tensor,
      :class:`KDRL` passes its scheduled value). 0 gives GRPO alone (the teacher is not read);
    * ``kl_estimator``: ``"k2"`` (default, the paper's choice), ``"k3"`` or ``"full"``;
    * ``kd_on``: ``"all"`` or ``"incorrect"`` (the paper's reward-guided KD at the response level:
      distil only on responses whose reward is below ``reward_threshold``, 1.0 by default, so
      with a 0/1 correctness reward only on the wrong ones);
    * ``clip_eps`` (0.2, GRPO/PPO's clipping range; used only with ``old_logprobs``);
    * ``rl_weight`` (1.0): weight of the policy-gradient term; 0 gives on-policy reverse-KL KD
      alone (advantages not needed).
    """
    _check_scalar_coefficient("kl_coef", kl_coef)
    if not rl_weight >= 0.0:
        raise ValueError(f"rl_weight must be >= 0, got {rl_weight}")
    with_kl = isinstance(kl_coef, torch.Tensor) or float(kl_coef) != 0.0
    if not with_kl and rl_weight == 0.0:
        raise ValueError("kdrl: rl_weight and kl_coef are both 0, so the term is identically 0; set one of them > 0")
    counted, leading_shape, policy, kl = _kdrl_parts(
        student_logits,
        teacher_logits,
        labels,
        advantages,
        rewards,
        old_logprobs,
        with_policy=rl_weight > 0.0,
        with_kl=with_kl,
        kl_estimator=kl_estimator,
        kd_on=kd_on,
        reward_threshold=reward_threshold,
        clip_eps=clip_eps,
        ignore_index=ignore_index,
        mask=mask,
    )
    per_token = _combine(policy, kl, rl_weight, kl_coef)
    return reduce_rows(per_token, counted, leading_shape, reduction)


@LOSSES.register(
    "grpo",
    summary="GRPO's policy-gradient surrogate with group-normalised advantages, token-level normalisation (Shao et al. 2024).",
)
def grpo(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Group Relative Policy Optimization's policy term (Shao et al., 2024, DeepSeekMath, eq. 3), no teacher.

    Per counted token of response ``i``: ``-min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)``,
    ``rho_t = pi(o_t) / pi_old(o_t)``; without ``old_logprobs`` (on-policy, one update per sample)
    the value is ``-A_i`` and the gradient ``-A_i grad log pi(o_t)``. Token-level normalisation
    (``"batchmean"``: over every counted token of every response). No KL to a reference model:
    add one as another term if wanted; with a teacher, :class:`KDRL` is this plus the teacher's
    reverse KL. Inputs as :func:`kdrl`; ``advantages`` reads ``batch.advantages`` (from
    :func:`distill.engine.rollout.group_rollout`).
    """
    if not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
    counted, _, _, token = _token_log_probs(student_logits, labels, mask, ignore_index)
    policy = _policy_rows(token, counted, advantages, old_logprobs, clip_eps)
    return reduce_rows(policy, counted, student_logits.shape[:-1], reduction)


def scheduled_coefficient(
    schedule: str, start: float, end: float, step: int, total_steps: int
) -> float:
    """The KL coefficient after ``step`` of ``total_steps`` optimizer steps.

    ``"constant"``: ``start``; ``"linear"``: ``start + (end - start) * p``; ``"cosine"``:
    ``end + (start - end) * (1 + cos(pi p)) / 2``; with ``p = min(step / total_steps, 1)``, so the
    value stays at ``end`` after ``total_steps``.
    """
    _check_choice("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        return float(start)
    progress = min(max(int(step), 0) / max(int(total_steps), 1), 1.0)
    if schedule == "linear":
        return float(start + (end - start) * progress)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@LOSSES.register(
    "kdrl",
    summary="KDRL: GRPO + annealed beta * reverse KL(student || teacher) on the student's own samples (Xu et al. 2025).",
)
class KDRL(torch.nn.Module):
    """KDRL (Xu et al., 2025, arXiv 2506.02208) as an objective term, with its KL-coefficient schedule.

    ``forward(student_logits, teacher_logits, labels, advantages=None, rewards=None,
    old_logprobs=None)`` is :func:`kdrl` at the current coefficient ``beta`` (a float64 buffer,
    checkpointed with the objective, so a resumed run continues the schedule exactly).
    :meth:`update`, which the engine calls after every optimizer step (as for TAID), sets ``beta``
    to the schedule's value for the number of steps done.

    **Schedule.** The paper compares constant coefficients with an annealed one that starts at
    ``5e-3`` (imitation first) and decays to ``1e-3`` (reward later), which it finds best; those
    are the defaults. The paper states the start and end values; the decay's shape is a choice
    here: ``schedule="linear"`` (default) over ``schedule_steps`` optimizer steps (None: the
    stage's total steps), or ``"cosine"``, or ``"constant"`` (``kl_coef`` throughout).

    Hyper-parameters (keyword-only): ``kl_coef`` (5e-3, the start), ``kl_coef_end`` (1e-3),
    ``schedule`` (``"linear"``), ``schedule_steps`` (None), and those of :func:`kdrl`:
    ``kl_estimator`` (``"k2"``), ``kd_on`` (``"all"``), ``reward_threshold`` (1.0), ``clip_eps``
    (0.2), ``rl_weight`` (1.0), ``ignore_index`` (-100). ``kl_coef=0, schedule="constant"`` is GRPO
    alone; ``rl_weight=0`` is reverse-KL distillation alone on the student's samples.

    After each call ``last_losses`` holds ``policy`` and ``kl`` (detached means per counted token
    of the two parts, the KL before its coefficient), for logs and tests.
    """

    coef: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        *,
        kl_coef: float = 5e-3,
        kl_coef_end: float = 1e-3,
        schedule: str = "linear",
        schedule_steps: int | None = None,
        kl_estimator: str = "k2",
        kd_on: str = "all",
        reward_threshold: float = 1.0,
        clip_eps: float = 0.2,
        rl_weight: float = 1.0,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
        _check_choice("kd_on", kd_on, KD_ON)
        if not kl_coef >= 0.0 or not kl_coef_end >= 0.0:
            raise ValueError(f"kl_coef and kl_coef_end must be >= 0, got {kl_coef} and {kl_coef_end}")
        if schedule_steps is not None and int(schedule_steps) < 1:
            raise ValueError(f"schedule_steps must be >= 1 (or None for the stage's total steps), got {schedule_steps}")
        if not rl_weight >= 0.0:
            raise ValueError(f"rl_weight must be >= 0, got {rl_weight}")
        if not 0.0 <= clip_eps < 1.0:
            raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps}")
        self.kl_coef = float(kl_coef)
        self.kl_coef_end = float(kl_coef_end)
        self.schedule = schedule
        self.schedule_steps = None if schedule_steps is None else int(schedule_steps)
        self.kl_estimator = kl_estimator
        self.kd_on = kd_on
        self.reward_threshold = float(reward_threshold)
        self.clip_eps = float(clip_eps)
        self.rl_weight = float(rl_weight)
        self.ignore_index = int(ignore_index)
        if not self.distills and self.rl_weight == 0.0:
            raise ValueError("KDRL: rl_weight and the KL coefficient are both 0, so the term is identically 0; set one of them > 0")
        self.register_buffer("coef", torch.tensor(self.kl_coef, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last_losses: dict[str, torch.Tensor] = {}

    @property
    def distills(self) -> bool:
        """Whether the teacher's KL is ever used (False for GRPO alone)."""
        return self.kl_coef > 0.0 or (self.schedule != "constant" and self.kl_coef_end > 0.0)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        advantages: torch.Tensor | None = None,
        rewards: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        reduction: str = "batchmean",
    ) -> torch.Tensor:
        counted, leading_shape, policy, kl = _kdrl_parts(
            student_logits,
            teacher_logits,
            labels,
            advantages,
            rewards,
            old_logprobs,
            with_policy=self.rl_weight > 0.0,
            with_kl=self.distills,
            kl_estimator=self.kl_estimator,
            kd_on=self.kd_on,
            reward_threshold=self.reward_threshold,
            clip_eps=self.clip_eps,
            ignore_index=self.ignore_index,
            mask=mask,
        )
        per_token = _combine(policy, kl, self.rl_weight, self.coef)
        with torch.no_grad():
            tokens = max(int(counted.sum()), 1)
            self.last_losses = {
                name: (part.detach().sum() / tokens if part is not None else per_token.new_zeros(()))
                for name, part in (("policy", policy), ("kl", kl))
            }
        return reduce_rows(per_token, counted, leading_shape, reduction)

    def coefficient(self, step: int, total_steps: int) -> float:
        """The schedule's KL coefficient after ``step`` optimizer steps (of the stage's ``total_steps``)."""
        horizon = self.schedule_steps if self.schedule_steps is not None else total_steps
        return scheduled_coefficient(self.schedule, self.kl_coef, self.kl_coef_end, step, horizon)

    @torch.no_grad()
    def update(self, *, step: int, total_steps: int, value: float) -> None:
        """After optimizer step ``step`` (of ``total_steps``): move ``beta`` along the schedule."""
        self.steps.fill_(int(step))
        self.coef.fill_(self.coefficient(int(step), int(total_steps)))

    def extra_repr(self) -> str:
        return (
            f"coef={float(self.coef):.6g}, kl_coef={self.kl_coef}, kl_coef_end={self.kl_coef_end}, "
            f"schedule='{self.schedule}', schedule_steps={self.schedule_steps}, kl_estimator='{self.kl_estimator}', "
            f"kd_on='{self.kd_on}', rl_weight={self.rl_weight}"
        )
