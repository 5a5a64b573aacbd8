"""Final answers of generated text: extraction, normalisation and comparison (data filters, rewards, task accuracy).

A rationale ends with a line such as ``Answer: 12``; the answer is the single group of a regular
expression (default :data:`DEFAULT_PATTERN`), taken from its *last* match, because models often
restate intermediate results before the final one. Self-consistency (Wang et al., "Self-Consistency
Improves Chain of Thought Reasoning in Language Models", ICLR 2023) votes over exactly these parsed
final answers; the ``correct`` filter compares them with a reference.

Two normalisations:

* ``number``: thousands separators are dropped and the value is written canonically (``1,234`` ->
  ``1234``, ``12.50`` -> ``12.5``, ``7.0`` -> ``7``, ``-0`` -> ``0``), so numerically equal
  answers compare equal. A group that is not a number gives no answer (``None``).
* ``text``: case-folded, inner whitespace collapsed, surrounding quotes, spaces and trailing
  punctuation removed.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Literal

DEFAULT_PATTERN = r"Answer:\s*(-?[\d,]*\.?\d+)"
"""The default answer pattern: ``Answer:`` followed by a (possibly negative, comma-grouped) number."""

Normalize = Literal["number", "text"]

_TRAILING = " \t\r\n.,;:!?\"'`*)]}"
_LEADING = " \t\r\n\"'`*([{"


@lru_cache(maxsize=64)
def compile_answer_pattern(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """``pattern`` compiled; it must have exactly one capturing group (the answer)."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"not a valid regular expression ({error})") from None
    if compiled.groups != 1:
        raise ValueError(f"must have exactly one capturing group (the answer), it has {compiled.groups}")
    return compiled


def normalize_number(text: str) -> str | None:
    """The canonical decimal string of ``text`` (commas dropped), or ``None`` when it is no number."""
    cleaned = text.strip().replace(",", "").replace("\u2212", "-")
    if not cleaned:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def normalize_text(text: str) -> str | None:
    """``text`` case-folded with whitespace collapsed and outer punctuation stripped; ``None`` if empty."""
    cleaned = " ".join(text.split()).casefold().rstrip(_TRAILING).lstrip(_LEADING)
    return cleaned or None


def normalize_answer(text: str | None, normalize: Normalize = "number") -> str | None:
    """``text`` normalised as ``normalize`` says (see the module docstring)."""
    if text is None:
        return None
    if normalize == "number":
        return normalize_number(text)
    if normalize == "text":
        return normalize_text(text)
    raise ValueError(f"normalize must be 'number' or 'text', got {normalize!r}")


def extract_answer(text: str, pattern: str | re.Pattern[str] = DEFAULT_PATTERN, normalize: Normalize = "number") -> str | None:
    """The normalised group of the last match of ``pattern`` in ``text``; ``None`` without one."""
    compiled = compile_answer_pattern(pattern)
    last = None
    for last in compiled.finditer(text):
        pass
    if last is None or last.group(1) is None:
        return None
    return normalize_answer(last.group(1), normalize)


def answers_match(answer: str | None, reference: str | None, normalize: Normalize = "number") -> bool:
    """Whether two answers are equal after normalisation; a missing one never matches."""
    left, right = normalize_answer(answer, normalize), normalize_answer(reference, normalize)
    return left is not None and right is not None and left == right
