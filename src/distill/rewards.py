"""Rule-based rewards of sampled completions, for GRPO-style training (KDRL, GRPO).

A rule-based reward scores a completion with a program rather than a learned model: the answer it
states is extracted and compared with the reference answer, as in DeepSeek-R1 and GRPO (Z. Shao et
al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024).

A reward function takes ``(completion_text, reference_text)`` and returns a float. The
:data:`REWARDS` registry names the builders of such functions, so an experiment can write::

    reward: {name: answer_match, params: {pattern: 'Answer:\\s*(-?[\\d,]*\\.?\\d+)', correct: 1.0}}

and :func:`build_reward` turns that into the function. An import path ``package.module:builder``
works as a name too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from distill.answers import (
    DEFAULT_PATTERN,
    compile_answer_pattern,
    extract_answer,
    normalize_answer,
    normalize_number,
)
from distill.registry import REWARDS, RegistryError, parameter_problems

__all__ = [
    "DEFAULT_ANSWER_PATTERN",
    "REWARDS",
    "RewardFn",
    "answer_match",
    "answer_reward",
    "build_reward",
    "extract_answer",
    "format_reward",
    "normalize_answer",
    "normalize_number",
]

RewardFn = Callable[[str, str], float]
"""``reward(completion_text, reference_text) -> float``."""

DEFAULT_ANSWER_PATTERN = DEFAULT_PATTERN
"""A final line such as ``Answer: 1,234.5``: the number after ``Answer:`` (commas allowed)."""


def answer_reward(
    completion: str,
    reference: str,
    *,
    pattern: str | re.Pattern[str] = DEFAULT_ANSWER_PATTERN,
    normalize: str = "number",
    correct: float = 1.0,
    wrong: float = 0.0,
    unformatted: float = 0.0,
) -> float:
    """``correct`` if ``completion``'s answer equals the reference's, ``wrong`` if it differs,
    ``unformatted`` if ``completion`` states no answer that ``pattern`` finds.

    ``reference`` is a reference completion (its answer is extracted with the same ``pattern``)
    or, when ``pattern`` finds nothing in it, the bare answer itself (``"42"``). A reference with
    no usable answer either way is an error: that row of the data cannot be scored.
    """
    expected = extract_answer(reference, pattern, normalize)
    if expected is None:
        expected = normalize_answer(reference, normalize)
    if expected is None or expected == "":
        raise ValueError(
            f"the reference {reference[:80]!r} holds no answer: the pattern {getattr(pattern, 'pattern', pattern)!r} "
            f"finds none, and it is not a bare answer under normalize='{normalize}'"
        )
    stated = extract_answer(completion, pattern, normalize)
    if stated is None:
        return float(unformatted)
    return float(correct if stated == expected else wrong)


@REWARDS.register("answer_match", summary="Rule-based correctness: the completion's last 'Answer: <number>' equals the reference's.")
def answer_match(
    *,
    pattern: str = DEFAULT_ANSWER_PATTERN,
    normalize: str = "number",
    correct: float = 1.0,
    wrong: float = 0.0,
    unformatted: float = 0.0,
) -> RewardFn:
    """Reward function of :func:`answer_reward` with these settings (checked once, here)."""
    compiled = compile_answer_pattern(pattern)
    normalize_answer("0", normalize)  # an unknown normalisation fails here, when the reward is built

    def reward(completion: str, reference: str) -> float:
        return answer_reward(
            completion,
            reference,
            pattern=compiled,
            normalize=normalize,
            correct=correct,
            wrong=wrong,
            unformatted=unformatted,
        )

    return reward


@REWARDS.register("format", summary="Rule-based format reward: whether the completion matches a pattern (e.g. a final 'Answer:').")
def format_reward(*, pattern: str = DEFAULT_ANSWER_PATTERN, present: float = 1.0, absent: float = 0.0) -> RewardFn:
    """``present`` if ``pattern`` occurs in the completion (``re.search``, DOTALL), else ``absent``;
    the reference is not read. DeepSeek-R1's format reward checks the reasoning/answer tags this way."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise ValueError(f"reward pattern {pattern!r} is not a valid regular expression: {error}") from None

    def reward(completion: str, reference: str) -> float:
        return float(present if compiled.search(completion) else absent)

    return reward


def build_reward(spec: str | Mapping[str, Any], params: Mapping[str, Any] | None = None) -> RewardFn:
    """The reward function of ``spec``: a name (with ``params``) or ``{name: ..., params: {...}}``.

    Unknown names and parameters are errors that list what is accepted.
    """
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"name", "params"})
        if unknown or "name" not in spec:
            raise ValueError(f"a reward is written {{name: ..., params: {{...}}}}; got keys {sorted(spec)}")
        name = str(spec["name"])
        params = dict(spec.get("params") or {})
    else:
        name = str(spec)
        params = dict(params or {})
    try:
        builder = REWARDS.get(name).builder
    except RegistryError as error:
        raise ValueError(str(error)) from None
    problems = parameter_problems(builder, params, what=f"reward '{name}'")
    if problems:
        raise ValueError("; ".join(message for _, message in problems))
    function = builder(**params)
    if not callable(function):
        raise TypeError(f"reward '{name}' built {type(function).__name__}, not a function (completion, reference) -> float")
    return function
