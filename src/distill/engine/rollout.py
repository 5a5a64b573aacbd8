"""Sampled completions scored for reinforcement learning and contrastive distillation.

* :func:`group_rollout`: GRPO's group sampling (Z. Shao et al., "DeepSeekMath: Pushing the Limits of
  Mathematical Reasoning in Open Language Models", 2024): each prompt is answered ``G`` times by
  the policy, each answer is scored by a rule-based reward (:mod:`distill.rewards`), and the
  advantages are the rewards normalised within each group. These rows, rewards and advantages
  feed the ``grpo`` and ``kdrl`` losses (sources ``batch.advantages``, ``batch.rewards``).
* :func:`sample_negatives`: QCRD's self-adversarial negatives (W. Wang et al., "QCRD:
  Quality-guided Contrastive Rationale Distillation for Large Language Models", EMNLP 2025):
  completions sampled at a high temperature from an *earlier* checkpoint of the student, paired
  with the data's positive completion as ``[B, 2, T]`` preference-layout tensors for ``qcrd``.

Both reuse :func:`distill.engine.lm.generate_completions` (left-padded prompts, KV cache,
temperature / top-p sampling, stop at EOS), so their rows follow the token-batch convention:
right-padded ids and shifted labels whose targets are exactly the generated tokens. Sampling uses
torch's global random generator: the same ``torch.manual_seed`` gives the same rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.data.base import IGNORE_INDEX
from distill.engine.lm import decode_targets, generate_completions, prompt_lengths

ADVANTAGE_SCALES: tuple[str, ...] = ("std", "none")


@dataclass(frozen=True)
class SamplingSpec:
    """What :func:`~distill.engine.lm.generate_completions` reads: the sampling settings of a rollout."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 decodes greedily), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.prompt_tokens is not None and int(self.prompt_tokens) < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")


@dataclass
class RolloutBatch:
    """``G`` sampled completions per prompt, with their rewards and group-normalised advantages.

    Rows ``g * G ... g * G + G - 1`` answer prompt ``g`` of the input batch (``group[i] = i // G``).
    ``input_ids`` / ``labels`` ``[B * G, T']`` are right-padded token rows whose targets are exactly
    the generated tokens; ``rewards``, ``advantages`` ``[B * G]`` float32; ``completions`` the
    decoded completions and ``reference_texts`` the decoded reference completion of each row's
    prompt (the data row's targets), both ``B * G`` strings.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    group: torch.Tensor
    reference_texts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)

    def sources(self) -> dict[str, torch.Tensor]:
        """The objective sources this rollout adds to a step's batch: ``batch.advantages`` and ``batch.rewards``."""
        return {"batch.advantages": self.advantages, "batch.rewards": self.rewards}


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's advantages of ``rewards`` ``[N]`` in consecutive groups of ``group_size``.

    ``scale="std"``: ``(r - mean_group) / (std_group + eps)`` (GRPO, Shao et al. 2024; the
    unbiased standard deviation and ``eps = 1e-4``, as TRL's ``GRPOTrainer``). ``scale="none"``:
    ``r - mean_group``, Dr. GRPO's unscaled advantage (Z. Liu et al., "Understanding R1-Zero-Like
    Training: A Critical Perspective", 2025), which does not up-weight groups whose rewards barely
    differ. A group whose rewards are all equal gets advantage 0 either way; ``group_size = 1``
    gives 0 everywhere (no baseline to compare with). Float32.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale_advantages must be one of {ADVANTAGE_SCALES}, got '{scale}'")
    if int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % int(group_size):
        raise ValueError(
            f"rewards must be a vector whose length is a multiple of group_size ({group_size}), got shape {tuple(rewards.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    grouped = rewards.detach().to(torch.float32).view(-1, int(group_size))
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif group_size == 1:
        centred = torch.zeros_like(centred)
    return centred.reshape(-1)


@torch.no_grad()
def group_rollout(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    group_size: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    pad_token_id: int,
    eos_token_id: int | None,
    tokenizer: Any,
    reward_fn: Callable[[str, str], float],
    scale_advantages: str = "std",
    prompt_tokens: int | None = None,
    eps: float = 1e-4,
) -> RolloutBatch:
    """Sample ``group_size`` completions of each prompt of ``input_ids`` ``[B, T]`` and score them.

    The prompt of a row is everything up to its first target (or its first ``prompt_tokens``
    tokens for plain text, as :func:`~distill.engine.lm.prompt_lengths`); the row's targets are its
    reference completion. Each prompt is repeated ``G`` times and sampled with ``model`` (the
    policy: the student) at ``temperature`` / ``top_p``, at most ``max_new_tokens`` tokens, stopping
    at ``eos_token_id``. Every completion and reference is decoded with ``tokenizer`` (special
    tokens skipped) and scored with ``reward_fn(completion_text, reference_text)`` (e.g.
    :func:`distill.rewards.build_reward`); the advantages are :func:`group_advantages` of the
    rewards (``scale_advantages``: ``"std"`` for GRPO, ``"none"`` for Dr. GRPO).
    """
    if input_ids.dim() != 2 or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"group_rollout needs input_ids and labels of shape [B, T], got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if scale_advantages not in ADVANTAGE_SCALES:
        raise ValueError(f"scale_advantages must be one of {ADVANTAGE_SCALES}, got '{scale_advantages}'")
    spec = SamplingSpec(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens)
    prompt_lengths(labels, prompt_tokens)  # a clear error for plain text without prompt_tokens, before sampling
    references = decode_targets(tokenizer, labels)
    repeated_ids = input_ids.repeat_interleave(int(group_size), dim=0)
    repeated_labels = labels.repeat_interleave(int(group_size), dim=0)
    new_ids, new_labels = generate_completions(
        model, repeated_ids, repeated_labels, spec, pad_token_id=pad_token_id, eos_token_id=eos_token_id
    )
    completions = decode_targets(tokenizer, new_labels)
    group = torch.arange(input_ids.shape[0], device=input_ids.device).repeat_interleave(int(group_size))
    row_references = [references[int(g)] for g in group.tolist()]
    scores = []
    for row, (completion, reference) in enumerate(zip(completions, row_references)):
        try:
            scores.append(float(reward_fn(completion, reference)))
        except Exception as error:
            error.add_note(f"while scoring completion {row} (prompt {row // int(group_size)}) of a group rollout")
            raise
    rewards = torch.tensor(scores, dtype=torch.float32, device=input_ids.device)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"the reward function returned a non-finite reward: {scores}")
    advantages = group_advantages(rewards, int(group_size), scale=scale_advantages, eps=eps)
    return RolloutBatch(
        input_ids=new_ids,
        labels=new_labels,
        rewards=rewards,
        advantages=advantages,
        group=group,
        reference_texts=row_references,
        completions=completions,
    )


def _pad_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if tensor.shape[-1] >= width:
        return tensor
    padding = tensor.new_full((*tensor.shape[:-1], width - tensor.shape[-1]), value)
    return torch.cat([tensor, padding], dim=-1)


def _longest_completion(labels: torch.Tensor) -> int:
    return max(int((labels != IGNORE_INDEX).sum(dim=-1).max()) if labels.numel() else 0, 1)


@torch.no_grad()
def sample_negatives(
    checkpoint_model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    temperature: float = 1.5,
    top_p: float = 1.0,
    max_new_tokens: int | None = None,
    prompt_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QCRD's self-adversarial pairs: the data's positive completion and one sampled by an earlier student.

    ``input_ids`` / ``labels`` are the positive rows, ``[B, T]`` (SFT data: the row's completion
    is the positive rationale) or pairs ``[B, 2, T]`` (index 0 is kept as the positive, index 1 is
    replaced). ``checkpoint_model`` is the earlier checkpoint of the student (e.g. the snapshot
    of the previous epoch, or the previous stage's weights); it completes each prompt at
    ``temperature`` (1.5 by default, the paper's value for its negatives), ``top_p``, at most
    ``max_new_tokens`` tokens (None: the longest positive completion of the batch).

    Returns ``(pair_ids [B, 2, T'], pair_labels [B, 2, T'])``: index 0 the positive row, index 1 the
    sampled negative (its targets exactly the sampled tokens), both right-padded to one width
    ``T'`` with ``pad_token_id`` / ``IGNORE_INDEX``.
    """
    if input_ids.dim() == 3:
        if input_ids.shape[1] != 2 or tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"pairs must have shape [B, 2, T] for input_ids and labels, got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
            )
        input_ids, labels = input_ids[:, 0], labels[:, 0]
    elif input_ids.dim() != 2 or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"sample_negatives needs rows [B, T] or pairs [B, 2, T], got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if max_new_tokens is None:
        max_new_tokens = _longest_completion(labels)
    spec = SamplingSpec(temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens), prompt_tokens=prompt_tokens)
    negative_ids, negative_labels = generate_completions(
        checkpoint_model, input_ids, labels, spec, pad_token_id=pad_token_id, eos_token_id=eos_token_id
    )
    width = max(input_ids.shape[-1], negative_ids.shape[-1])
    pair_ids = torch.stack([_pad_to(input_ids, width, pad_token_id), _pad_to(negative_ids, width, pad_token_id)], dim=1)
    pair_labels = torch.stack([_pad_to(labels, width, IGNORE_INDEX), _pad_to(negative_labels, width, IGNORE_INDEX)], dim=1)
    return pair_ids, pair_labels

