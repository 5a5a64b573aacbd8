"""KDRL (Xu et al. 2025) and GRPO: the policy term's gradient against A * grad log pi, the KL
estimators against float64 formulas and their expectations under the student's own samples,
reward-guided KD, token-level normalisation, masking, and the checkpointed KL schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.losses import KDRL, grpo, kdrl
from distill.losses.kdrl import scheduled_coefficient
from distill.objective import Objective, Term
from distill.registry import LOSSES

B, T, V = 4, 6, 5


def _rollout(seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 1.5) -> dict[str, torch.Tensor]:
    """Responses [B, T, V] of unequal lengths: position 0 is prompt, row 1 ends early (labels -100),
    row 3 has a masked tail."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, 0] = -100
    labels[1, 3:] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[3, -2:] = False
    return {
        "student": (torch.randn(B, T, V, generator=g) * scale).to(dtype),
        "teacher": (torch.randn(B, T, V, generator=g) * scale).to(dtype),
        "labels": labels,
        "mask": mask,
        "advantages": torch.tensor([1.2, -0.7, 0.3, -0.9], dtype=dtype),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dtype),
    }


def _counted(data: dict) -> torch.Tensor:
    return (data["labels"] != -100) & data["mask"]


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_z for x in row]


def _kl_loop(data: dict, estimator: str, reduction: str) -> torch.Tensor:
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not bool(_counted(data)[b, t]):
                continue
            log_q = _log_softmax(data["student"][b, t].tolist())
            log_p = _log_softmax(data["teacher"][b, t].tolist())
            y = int(data["labels"][b, t])
            ratio = log_q[y] - log_p[y]
            if estimator == "k2":
                out[b, t] = 0.5 * ratio**2
            elif estimator == "k3":
                out[b, t] = math.exp(-ratio) - 1.0 + ratio
            else:
                out[b, t] = sum(math.exp(a) * (a - c) for a, c in zip(log_q, log_p))
    if reduction == "none":
        return out
    return out.sum() if reduction == "sum" else out.sum() / int(_counted(data).sum())


# --- the policy term ------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["kdrl", "grpo"])
def test_policy_gradient_is_advantage_times_grad_log_pi(loss: str) -> None:
    """On-policy: value -sum_i A_i |o_i| / N and gradient -sum_i A_i sum_t grad log pi(o_t) / N,
    with grad_z log softmax(z)[y] = onehot(y) - softmax(z) and N the counted tokens of all responses."""
    data = _rollout(1)
    student = data["student"].clone().requires_grad_(True)
    if loss == "kdrl":
        value = kdrl(student, data["teacher"], data["labels"], data["advantages"], kl_coef=0.0, mask=data["mask"])
    else:
        value = grpo(student, data["labels"], data["advantages"], mask=data["mask"])
    value.backward()
    counted = _counted(data)
    tokens = int(counted.sum())
    lengths = counted.sum(-1).double()
    torch.testing.assert_close(value.detach(), -(data["advantages"] * lengths).sum() / tokens)
    onehot = torch.nn.functional.one_hot(data["labels"].clamp_min(0), V).double()
    expected = -data["advantages"][:, None, None] * (onehot - torch.softmax(data["student"], -1)) / tokens
    expected[~counted] = 0.0
    torch.testing.assert_close(student.grad, expected)


def test_token_level_normalisation_weights_long_responses_more() -> None:
    """GRPO's token-level mean (sum over all tokens / all tokens), not a mean of per-response means."""
    data = _rollout(2)
    value = grpo(data["student"], data["labels"], data["advantages"], mask=data["mask"])
    lengths = _counted(data).sum(-1).double()
    per_response_mean = -data["advantages"].mean()
    torch.testing.assert_close(value, -(data["advantages"] * lengths).sum() / lengths.sum())
    assert not torch.allclose(value, per_response_mean)
    total = grpo(data["student"], data["labels"], data["advantages"], mask=data["mask"], reduction="sum")
    torch.testing.assert_close(total, value * lengths.sum())


def test_old_logprobs_clip_like_ppo() -> None:
    data = _rollout(3)
    counted = _counted(data)
    log_q = torch.log_softmax(data["student"], -1).gather(-1, data["labels"].clamp_min(0)[..., None]).squeeze(-1)
    g = torch.Generator().manual_seed(0)
    old = log_q + torch.empty(B, T, dtype=torch.float64).uniform_(-0.5, 0.5, generator=g)
    student = data["student"].clone().requires_grad_(True)
    value = grpo(student, data["labels"], data["advantages"], old, clip_eps=0.2, mask=data["mask"], reduction="none")
    ratio = torch.exp(log_q - old)
    a = data["advantages"][:, None].expand(B, T)
    expected = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    expected[~counted] = 0.0
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    # tokens where the clipped branch is the minimum get no gradient
    clipped = ((a > 0) & (ratio > 1.2)) | ((a < 0) & (ratio < 0.8))
    assert bool((clipped & counted).any()) and bool((~clipped & counted).any())
    assert torch.all(student.grad[clipped & counted] == 0)
    assert torch.all(student.grad[~clipped & counted].abs().sum(-1) > 0)
    # old log-probs equal to the current ones: the on-policy value and gradient
    on_policy = grpo(data["student"], data["labels"], data["advantages"], mask=data["mask"])
    torch.testing.assert_close(grpo(data["student"], data["labels"], data["advantages"], log_q, mask=data["mask"]), on_policy)


# --- the KL estimators ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("estimator", ["k2", "k3", "full"])
def test_estimators_match_formulas(estimator: str, reduction: str) -> None:
    data = _rollout(4)
    value = kdrl(data["student"], data["teacher"], data["labels"], kl_coef=1.0, rl_weight=0.0, kl_estimator=estimator,
                 mask=data["mask"], reduction=reduction)
    torch.testing.assert_close(value, _kl_loop(data, estimator, reduction), rtol=1e-10, atol=1e-12)


def test_estimators_under_the_students_own_samples() -> None:
    """o ~ q: E[k3] = KL(q||p) (unbiased value); E[grad k2] = grad KL(q||p) (the reverse KL's
    gradient, KDRL's reason for k2); E[grad k3] = grad KL(p||q) (the forward KL's)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    teacher = torch.randn(V, generator=g, dtype=torch.float64)
    n = 200_000
    samples = torch.multinomial(torch.softmax(z, -1), n, replacement=True, generator=g).view(n, 1)

    def estimate(estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = z.clone().requires_grad_(True)
        value = kdrl(leaf.expand(n, 1, V), teacher.expand(n, 1, V), samples, kl_coef=1.0, rl_weight=0.0,
                     kl_estimator=estimator)
        (grad,) = torch.autograd.grad(value, leaf)
        return value.detach(), grad

    leaf = z.clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(leaf, -1), torch.log_softmax(teacher, -1)
    reverse = (log_q.exp() * (log_q - log_p)).sum()
    (reverse_grad,) = torch.autograd.grad(reverse, leaf)
    forward = (log_p.exp() * (log_p - torch.log_softmax(leaf, -1))).sum()
    (forward_grad,) = torch.autograd.grad(forward, leaf)
    k3_value, k3_grad = estimate("k3")
    k2_value, k2_grad = estimate("k2")
    full_value, full_grad = estimate("full")
    torch.testing.assert_close(k3_value, reverse.detach(), atol=0.02, rtol=0.02)
    torch.testing.assert_close(k2_grad, reverse_grad, atol=0.01, rtol=0.03)
    torch.testing.assert_close(k3_grad, forward_grad, atol=0.01, rtol=0.03)
    torch.testing.assert_close(full_value, reverse.detach())
    torch.testing.assert_close(full_grad, reverse_grad)
    # k2's value estimates E_q[l^2 / 2], which is not the KL
    exact_k2 = (log_q.exp() * 0.5 * (log_q - log_p) ** 2).sum().detach()
    torch.testing.assert_close(k2_value, exact_k2, atol=0.02, rtol=0.02)
    assert abs(float(exact_k2 - reverse.detach())) > 0.01


@pytest.mark.parametrize("estimator, target", [("k2", "reverse"), ("k3", "forward"), ("k3", "value")])
def test_exact_expectations_over_the_vocabulary(estimator: str, target: str) -> None:
    """The same statements exactly: every token v as a sample, weighted by q(v)."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(V, generator=g, dtype=torch.float64)
    teacher = torch.randn(V, generator=g, dtype=torch.float64)
    leaf = z.clone().requires_grad_(True)
    per_token = kdrl(leaf.expand(V, 1, V), teacher.expand(V, 1, V), torch.arange(V).view(V, 1), kl_coef=1.0,
                     rl_weight=0.0, kl_estimator=estimator, reduction="none").squeeze(-1)
    q = torch.softmax(z, -1)
    log_q, log_p = torch.log_softmax(leaf, -1), torch.log_softmax(teacher, -1)
    if target == "value":
        torch.testing.assert_close((q * per_token).sum(), (log_q.exp() * (log_q - log_p)).sum().detach())
        return
    (expected_grad,) = torch.autograd.grad(
        (log_q.exp() * (log_q - log_p)).sum() if target == "reverse" else (log_p.exp() * (log_p - log_q)).sum(), leaf
    )
    (grad,) = torch.autograd.grad((q * per_token).sum(), leaf)
    torch.testing.assert_close(grad, expected_grad)


def test_gradcheck_float64() -> None:
    """The KL terms, and the policy term with old log-probabilities (the on-policy surrogate's value
    is constant by construction, so only its gradient, tested above, means anything)."""
    data = _rollout(6, scale=1.0)
    student = data["student"].clone().requires_grad_(True)
    old = torch.log_softmax(data["student"], -1).gather(-1, data["labels"].clamp_min(0)[..., None]).squeeze(-1) + 0.05
    for estimator in ("k2", "k3", "full"):
        assert torch.autograd.gradcheck(
            lambda x, e=estimator: kdrl(x, data["teacher"], data["labels"], data["advantages"], data["rewards"],
                                        kl_coef=0.3, kl_estimator=e, kd_on="incorrect", rl_weight=0.0, mask=data["mask"]),
            (student,), eps=1e-6, atol=1e-7,
        )
        assert torch.autograd.gradcheck(
            lambda x, e=estimator: kdrl(x, data["teacher"], data["labels"], data["advantages"], None, old,
                                        kl_coef=0.3, kl_estimator=e, mask=data["mask"], reduction="none"),
            (student,), eps=1e-6, atol=1e-7,
        )
    assert torch.autograd.gradcheck(
        lambda x: grpo(x, data["labels"], data["advantages"], old, mask=data["mask"], reduction="none"),
        (student,), eps=1e-6, atol=1e-7,
    )


# --- reward-guided KD, weights and contract -------------------------------------------------------


def test_kd_on_incorrect_distils_only_responses_below_the_threshold() -> None:
    data = _rollout(7)
    per_token = kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], data["rewards"],
                     kl_coef=0.5, kd_on="incorrect", mask=data["mask"], reduction="none")
    policy = kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], kl_coef=0.0,
                  mask=data["mask"], reduction="none")
    kl = _kl_loop(data, "k2", "none")
    wrong = (data["rewards"] < 1.0)[:, None].expand(B, T)
    torch.testing.assert_close(per_token, policy + 0.5 * kl * wrong)
    # the threshold moves the line: with 2.0 every response (rewards 0 and 1) is distilled
    everything = kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], data["rewards"],
                      kl_coef=0.5, kd_on="incorrect", reward_threshold=2.0, mask=data["mask"], reduction="none")
    torch.testing.assert_close(everything, policy + 0.5 * kl)
    with pytest.raises(ValueError, match="needs the rewards"):
        kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], kd_on="incorrect")


def test_kd_only_and_grpo_only_are_expressible() -> None:
    data = _rollout(8)
    kd_only = kdrl(data["student"], data["teacher"], data["labels"], kl_coef=0.2, rl_weight=0.0, mask=data["mask"])
    torch.testing.assert_close(kd_only, 0.2 * _kl_loop(data, "k2", "batchmean"))
    grpo_only = kdrl(data["student"], torch.full_like(data["teacher"], float("nan")), data["labels"], data["advantages"],
                     kl_coef=0.0, mask=data["mask"])
    torch.testing.assert_close(grpo_only, grpo(data["student"], data["labels"], data["advantages"], mask=data["mask"]))
    with pytest.raises(ValueError, match="needs advantages"):
        kdrl(data["student"], data["teacher"], data["labels"], kl_coef=0.1)
    with pytest.raises(ValueError, match="identically 0"):
        kdrl(data["student"], data["teacher"], data["labels"], kl_coef=0.0, rl_weight=0.0)


def test_teacher_and_advantages_get_no_gradient() -> None:
    data = _rollout(9)
    student = data["student"].clone().requires_grad_(True)
    teacher = data["teacher"].clone().requires_grad_(True)
    advantages = data["advantages"].clone().requires_grad_(True)
    kdrl(student, teacher, data["labels"], advantages, kl_coef=0.5, kl_estimator="full", mask=data["mask"]).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and advantages.grad is None


def test_masked_positions_change_nothing_and_fully_masked_is_zero() -> None:
    clean = _rollout(10, dtype=torch.float32)
    counted = _counted(clean)
    garbage = {k: v.clone() for k, v in clean.items()}
    garbage["student"][~counted] = 1e30
    garbage["teacher"][~counted] = -1e30
    garbage["labels"][~clean["mask"]] = V - 1
    results = []
    for data in (clean, garbage):
        student = data["student"].clone().requires_grad_(True)
        value = kdrl(student, data["teacher"], data["labels"], data["advantages"], kl_coef=0.5, kl_estimator="k3",
                     mask=data["mask"])
        value.backward()
        results.append((value.detach(), student.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert torch.all(results[1][1][~counted] == 0)
    student = clean["student"].clone().requires_grad_(True)
    for reduction in ("batchmean", "sum", "none"):
        value = kdrl(student, clean["teacher"], clean["labels"], clean["advantages"], kl_coef=0.5,
                     mask=torch.zeros(B, T, dtype=torch.bool), reduction=reduction)
        assert torch.all(value == 0)
        value.sum().backward()
        assert student.grad is None or torch.all(student.grad == 0)


@pytest.mark.parametrize("estimator", ["k2", "k3", "full"])
def test_low_precision_and_extreme_inputs(estimator: str) -> None:
    data = _rollout(15, dtype=torch.bfloat16)
    value = kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], kl_coef=0.5,
                 kl_estimator=estimator, mask=data["mask"])
    assert value.dtype == torch.float32 and torch.isfinite(value)
    extreme = _rollout(15, dtype=torch.float32, scale=1e4)
    student = extreme["student"].clone().requires_grad_(True)
    value = kdrl(student, extreme["teacher"], extreme["labels"], extreme["advantages"], kl_coef=0.5,
                 kl_estimator=estimator, mask=extreme["mask"])
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def test_shape_errors_name_the_argument() -> None:
    data = _rollout(11)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\); expected one value per response, \(4,\)"):
        kdrl(data["student"], data["teacher"], data["labels"], data["advantages"][:3])
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], kl_estimator="k1")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        bad = data["labels"].clone()
        bad[0, 1] = 7
        grpo(data["student"], bad, data["advantages"])


# --- the module and its schedule ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_values_over_steps(schedule: str) -> None:
    module = KDRL(kl_coef=5e-3, kl_coef_end=1e-3, schedule=schedule)
    assert float(module.coef) == 5e-3
    total = 8
    seen = []
    for step in range(1, 12):
        module.update(step=step, total_steps=total, value=0.0)
        progress = min(step / total, 1.0)
        if schedule == "constant":
            expected = 5e-3
        elif schedule == "linear":
            expected = 5e-3 + (1e-3 - 5e-3) * progress
        else:
            expected = 1e-3 + (5e-3 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(module.coef) == pytest.approx(expected, rel=1e-12)
        seen.append(float(module.coef))
    if schedule != "constant":
        assert all(a >= b for a, b in itertools.pairwise(seen)) and seen[-1] == pytest.approx(1e-3)


def test_schedule_steps_override_and_state_dict_round_trip() -> None:
    module = KDRL(kl_coef=4e-3, kl_coef_end=0.0, schedule="linear", schedule_steps=4)
    module.update(step=1, total_steps=100, value=0.0)
    assert float(module.coef) == pytest.approx(3e-3)
    restored = KDRL(kl_coef=4e-3, kl_coef_end=0.0, schedule="linear", schedule_steps=4)
    restored.load_state_dict(module.state_dict())
    assert float(restored.coef) == pytest.approx(3e-3) and int(restored.steps) == 1
    data = _rollout(12)
    torch.testing.assert_close(
        restored(data["student"], data["teacher"], data["labels"], data["advantages"], mask=data["mask"]),
        kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], kl_coef=3e-3, mask=data["mask"]),
    )
    restored.update(step=2, total_steps=100, value=0.0)
    assert float(restored.coef) == pytest.approx(2e-3)
    assert scheduled_coefficient("linear", 4e-3, 0.0, 9, 4) == 0.0


def test_module_forward_logs_its_parts() -> None:
    data = _rollout(13)
    module = KDRL(kl_coef=0.1, schedule="constant", kd_on="incorrect")
    value = module(data["student"], data["teacher"], data["labels"], data["advantages"], data["rewards"], mask=data["mask"])
    torch.testing.assert_close(
        value,
        kdrl(data["student"], data["teacher"], data["labels"], data["advantages"], data["rewards"], kl_coef=0.1,
             kd_on="incorrect", mask=data["mask"]),
    )
    policy = grpo(data["student"], data["labels"], data["advantages"], mask=data["mask"])
    torch.testing.assert_close(module.last_losses["policy"], policy)
    torch.testing.assert_close(value, module.last_losses["policy"] + 0.1 * module.last_losses["kl"])
    with pytest.raises(ValueError, match="identically 0"):
        KDRL(kl_coef=0.0, schedule="constant", rl_weight=0.0)


def test_objective_wiring_and_engine_update() -> None:
    assert LOSSES.get("kdrl").builder is KDRL and LOSSES.get("grpo").builder is grpo
    objective = Objective([
        Term("kdrl", "kdrl", params={"kd_on": "incorrect"},
             inputs={"advantages": "batch.advantages", "rewards": "batch.rewards"}),
    ])
    assert objective.updatable == ["kdrl"]
    assert objective.required_sources == {"student.logits", "teacher.logits", "batch.labels", "batch.advantages", "batch.rewards"}
    data = _rollout(14, dtype=torch.float32)
    sources = {"student.logits": data["student"], "teacher.logits": data["teacher"], "batch.labels": data["labels"],
               "batch.advantages": data["advantages"], "batch.rewards": data["rewards"]}
    objective(sources, mask=data["mask"], reduction="sum")
    objective.update(step=5, total_steps=10, values={"kdrl": 0.0})
    assert float(objective.losses["kdrl"].coef) == pytest.approx(3e-3)
    assert "losses.kdrl.coef" in objective.state_dict()
    # GRPO's required advantages read the rollout's source unless told otherwise
    assert Term("grpo", "grpo").sources["advantages"] == "batch.advantages"
