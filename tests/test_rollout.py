"""GRPO group rollouts and QCRD negatives with the tiny real tokenizer and Llamas, group-normalised
advantages, and the rule-based rewards."""

from __future__ import annotations

import pytest
import torch

from distill.data.base import IGNORE_INDEX
from distill.engine.lm import prompt_lengths
from distill.engine.rollout import (
    RolloutBatch,
    group_advantages,
    group_rollout,
    sample_negatives,
)
from distill.models.causal_lm import hf_causal_lm, load_tokenizer
from distill.rewards import (
    REWARDS,
    answer_reward,
    build_reward,
    extract_answer,
    normalize_number,
)
from tests.lm_fixtures import tiny_chat_dataset

G = 4


@pytest.fixture(scope="module")
def setup(tiny_lm, single_thread) -> dict:
    raw = tiny_chat_dataset(tokenizer=str(tiny_lm["tokenizer"]), samples=3, length=40)
    return {
        "ids": raw.train.inputs,
        "labels": raw.train.labels,
        "meta": raw.meta,
        "student": hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["student"])),
        "teacher": hf_causal_lm(num_classes=raw.num_classes, source=str(tiny_lm["teacher"])),
        "tokenizer": load_tokenizer(str(tiny_lm["tokenizer"])),
        "folder": str(tiny_lm["tokenizer"]),
    }


def _letter_reward(completion: str, reference: str) -> float:
    """A reward we control: 1 if the completion contains the letter 'e', plus 0.1 per character
    (so rewards differ within a group), 0 for an empty completion."""
    return (1.0 if "e" in completion else 0.0) + 0.1 * len(completion)


def _rollout(setup: dict, seed: int, **options) -> RolloutBatch:
    torch.manual_seed(seed)
    settings = {
        "group_size": G,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 8,
        "tokenizer": setup["tokenizer"],
        "reward_fn": _letter_reward,
        "pad_token_id": setup["meta"]["pad_token_id"],
        "eos_token_id": setup["meta"]["eos_token_id"],
    }
    settings.update(options)
    return group_rollout(setup["student"], setup["ids"], setup["labels"], **settings)


# --- group rollouts -------------------------------------------------------------------------------


def test_group_rollout_rows_labels_rewards_and_advantages(setup: dict) -> None:
    rollout = _rollout(setup, 0)
    rows = setup["ids"].shape[0] * G
    assert rollout.input_ids.shape[0] == rows and rollout.labels.shape == rollout.input_ids.shape
    assert rollout.rewards.shape == rollout.advantages.shape == rollout.group.shape == (rows,)
    assert rollout.group.tolist() == [g for g in range(setup["ids"].shape[0]) for _ in range(G)]
    lengths = prompt_lengths(setup["labels"], None)
    tokenizer = setup["tokenizer"]
    for row in range(rows):
        source = row // G
        length = int(lengths[source])
        assert torch.equal(rollout.input_ids[row, :length], setup["ids"][source, :length])  # its prompt
        targets = rollout.labels[row][rollout.labels[row] != IGNORE_INDEX]
        assert 1 <= targets.numel() <= 8
        # the targets are exactly the generated tokens that follow the prompt
        assert torch.equal(targets, rollout.input_ids[row, length : length + targets.numel()])
        assert (rollout.labels[row, : length - 1] == IGNORE_INDEX).all()
        completion = tokenizer.decode(targets.tolist(), skip_special_tokens=True)
        reference = tokenizer.decode(setup["labels"][source][setup["labels"][source] != IGNORE_INDEX].tolist(),
                                     skip_special_tokens=True)
        assert rollout.completions[row] == completion and rollout.reference_texts[row] == reference
        assert float(rollout.rewards[row]) == pytest.approx(_letter_reward(completion, reference))
    assert "the" in rollout.reference_texts[0]  # the data's answers read "the <word> is <word>"
    grouped = rollout.rewards.view(-1, G)
    assert float(grouped.std(dim=1).max()) > 0  # the controlled reward does vary within groups
    advantages = rollout.advantages.view(-1, G)
    torch.testing.assert_close(advantages.mean(dim=1), torch.zeros(grouped.shape[0]), atol=1e-6, rtol=0)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(advantages, expected)
    assert rollout.sources().keys() == {"batch.advantages", "batch.rewards"}


def test_greedy_rollout_matches_generate_on_each_prompt(setup: dict) -> None:
    """With temperature 0, each sampled completion is what the model's own greedy decoding writes
    from the unpadded prompt alone: the rows hold exactly the generated tokens."""
    rollout = _rollout(setup, 0, temperature=0.0, group_size=2)
    lengths = prompt_lengths(setup["labels"], None)
    eos = setup["meta"]["eos_token_id"]
    for source in range(setup["ids"].shape[0]):
        length = int(lengths[source])
        output = setup["student"].model.generate(
            input_ids=setup["ids"][source : source + 1, :length], attention_mask=torch.ones(1, length, dtype=torch.long),
            max_new_tokens=8, do_sample=False, pad_token_id=setup["meta"]["pad_token_id"], eos_token_id=eos,
        )[0, length:]
        if (output == eos).any():
            output = output[: int((output == eos).nonzero()[0]) + 1]
        for row in (2 * source, 2 * source + 1):
            targets = rollout.labels[row][rollout.labels[row] != IGNORE_INDEX]
            assert torch.equal(targets, output)


def test_rollout_is_deterministic_under_the_seed(setup: dict) -> None:
    first, again, other = _rollout(setup, 3), _rollout(setup, 3), _rollout(setup, 4)
    assert torch.equal(first.input_ids, again.input_ids) and torch.equal(first.rewards, again.rewards)
    assert first.completions == again.completions
    assert first.completions != other.completions


def test_unscaled_advantages_and_reward_errors(setup: dict) -> None:
    rollout = _rollout(setup, 5, scale_advantages="none")
    grouped = rollout.rewards.view(-1, G)
    torch.testing.assert_close(rollout.advantages.view(-1, G), grouped - grouped.mean(1, keepdim=True))

    def broken(completion: str, reference: str) -> float:
        raise KeyError("no answer")

    with pytest.raises(KeyError) as error:
        _rollout(setup, 5, reward_fn=broken)
    assert any("while scoring completion 0" in note for note in error.value.__notes__)
    with pytest.raises(ValueError, match="scale_advantages must be one of"):
        _rollout(setup, 5, scale_advantages="rank")
    plain = tiny_chat_dataset(tokenizer=setup["folder"], samples=2, plain=True)
    with pytest.raises(ValueError, match="prompt_tokens"):
        group_rollout(setup["student"], plain.train.inputs, plain.train.labels, group_size=2, tokenizer=setup["tokenizer"],
                      reward_fn=_letter_reward, pad_token_id=0, eos_token_id=None)


def test_group_advantages() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = group_advantages(rewards, 4)
    first = torch.tensor([1.0, 0.0, 0.0, 1.0])
    torch.testing.assert_close(std[:4], (first - 0.5) / (first.std() + 1e-4))
    assert torch.all(std[4:] == 0)  # all equal: no signal
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none")[:4], first - 0.5)
    assert torch.all(group_advantages(rewards, 1) == 0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)


# --- QCRD negatives -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "pairs"])
def test_sample_negatives_builds_pairs_with_the_data_positive(setup: dict, layout: str) -> None:
    ids, labels = setup["ids"], setup["labels"]
    inputs, targets = (ids, labels) if layout == "rows" else (torch.stack([ids, ids.flip(0)], 1), torch.stack([labels, labels.flip(0)], 1))
    torch.manual_seed(0)
    pair_ids, pair_labels = sample_negatives(
        setup["teacher"], inputs, targets, pad_token_id=setup["meta"]["pad_token_id"], eos_token_id=setup["meta"]["eos_token_id"]
    )
    rows, width = ids.shape[0], pair_ids.shape[-1]
    assert pair_ids.shape == pair_labels.shape == (rows, 2, width) and width >= ids.shape[1]
    torch.testing.assert_close(pair_ids[:, 0, : ids.shape[1]], ids)
    torch.testing.assert_close(pair_labels[:, 0, : ids.shape[1]], labels)
    assert (pair_labels[:, 0, ids.shape[1] :] == IGNORE_INDEX).all()
    lengths = prompt_lengths(labels, None)
    longest = int((labels != IGNORE_INDEX).sum(-1).max())
    for row in range(rows):
        length = int(lengths[row])
        assert torch.equal(pair_ids[row, 1, :length], ids[row, :length])  # the same prompt
        negative = pair_labels[row, 1][pair_labels[row, 1] != IGNORE_INDEX]
        assert 1 <= negative.numel() <= longest  # max_new_tokens defaults to the longest positive
        assert torch.equal(negative, pair_ids[row, 1, length : length + negative.numel()])
    torch.manual_seed(0)
    again = sample_negatives(setup["teacher"], inputs, targets, pad_token_id=setup["meta"]["pad_token_id"],
                             eos_token_id=setup["meta"]["eos_token_id"])
    assert torch.equal(again[0], pair_ids)
    with pytest.raises(ValueError, match=r"\[B, T\] or pairs \[B, 2, T\]"):
        sample_negatives(setup["teacher"], ids[0], labels[0], pad_token_id=0, eos_token_id=None)


# --- rewards --------------------------------------------------------------------------------------


def test_extract_answer_takes_the_last_match_and_normalises_numbers() -> None:
    assert extract_answer("Answer: 3 ... wait. Answer: 1,200.50") == "1200.5"
    assert extract_answer("Answer: -12.0") == "-12"
    assert extract_answer("the answer is 12") is None
    assert extract_answer("Answer: x") is None
    assert extract_answer("Final: Paris", r"Final:\s*(\w+)", normalize="text") == "paris"
    assert [normalize_number(s) for s in ("12", "12.0", "012", "1,000", "-0", "0.50", "abc", "")] == [
        "12", "12", "12", "1000", "0", "0.5", None, None,
    ]


def test_answer_reward() -> None:
    assert answer_reward("so Answer: 12.0", "12") == 1.0
    assert answer_reward("so Answer: 12", "reasoning ... Answer: 1,2") == 1.0  # the reference's own answer line
    assert answer_reward("Answer: 13", "12", wrong=-1.0) == -1.0
    assert answer_reward("I think 12", "12", unformatted=-0.5) == -0.5
    with pytest.raises(ValueError, match="holds no answer"):
        answer_reward("Answer: 1", "no number here")


def test_reward_registry() -> None:
    assert {"answer_match", "format"} <= set(REWARDS.names())
    reward = build_reward({"name": "answer_match", "params": {"correct": 2.0, "unformatted": -1.0}})
    assert reward("Answer: 7", "7") == 2.0 and reward("7", "7") == -1.0
    formatted = build_reward("format", {"pattern": r"<think>.*</think>"})
    assert formatted("<think>a\nb</think> 3", "") == 1.0 and formatted("3", "") == 0.0
    with pytest.raises(ValueError, match="unknown reward 'answer'"):
        build_reward("answer")
    with pytest.raises(ValueError, match="has no parameter 'corect'.*did you mean 'correct'"):
        build_reward({"name": "answer_match", "params": {"corect": 1.0}})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_reward("answer_match", {"pattern": "Answer: ("})
    with pytest.raises(ValueError, match="normalize must be"):
        build_reward("answer_match", {"normalize": "float"})
