"""Where the prompts of a generation run come from: a built-in task, seed prompts, or documents.

* :func:`arithmetic_problems`: word problems with a checkable integer answer and a gold rationale
  (``7 + 5 = 12.\\nAnswer: 12``), seeded and deterministic; :func:`write_arithmetic_chat_jsonl`
  writes them as ``chat_jsonl`` training or evaluation data.
* :func:`read_seed_prompts`: prompts (and optional reference answers) from JSONL files.
* :func:`chunk_document` and :func:`parse_qa_pairs`: the MechGPT recipe (Buehler, "MechGPT, a
  language-based strategy for mechanics and materials modeling that connects knowledge across
  scales, disciplines and modalities", Applied Mechanics Reviews 2024 / arXiv 2023): a general LLM
  reads raw documents chunk by chunk and writes question-answer pairs about each chunk, which
  become the training data of a specialised model.

Every source yields :class:`PromptItem` objects with a stable ``id``; the pipeline derives
per-prompt sampling seeds and its resume journal from these ids.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.io import atomic_write_text, iter_user_jsonl, read_user_text


@dataclass
class PromptItem:
    """One prompt of a run: ``question`` (task and seed prompts) or ``document`` (a chunk)."""

    id: str
    question: str | None = None
    reference: str | None = None
    document: str | None = None
    source: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The built-in arithmetic task
# --------------------------------------------------------------------------------------------

NAMES: tuple[tuple[str, str], ...] = (
    ("Ana", "she"), ("Ben", "he"), ("Chloe", "she"), ("David", "he"), ("Elena", "she"), ("Farid", "he"),
    ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jonas", "he"), ("Kemi", "she"), ("Luis", "he"),
    ("Maya", "she"), ("Noah", "he"), ("Olga", "she"), ("Pablo", "he"), ("Rosa", "she"), ("Sam", "he"),
)
OBJECTS: tuple[str, ...] = (
    "apples", "books", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards", "balloons",
    "oranges", "coins",
)
OPERATIONS = ("+", "-", "*")
SYMBOLS = {"+": "+", "-": "-", "*": "×"}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{name} has {a} {things} and buys {b} more. How many {things} does {pronoun} have now?",
        "{name} had {a} {things}. A friend gave {name} {b} more. How many {things} does {name} have?",
        "There are {a} {things} in a box and {b} {things} on the table. How many {things} are there in all?",
    ),
    "-": (
        "{name} has {a} {things} and gives {b} of them away. How many {things} does {pronoun} have left?",
        "{name} had {a} {things} and lost {b}. How many {things} does {name} have now?",
        "A shop had {a} {things} and sold {b}. How many {things} are left?",
    ),
    "*": (
        "{name} buys {a} bags with {b} {things} in each bag. How many {things} does {pronoun} buy in total?",
        "There are {a} boxes and each box holds {b} {things}. How many {things} are there altogether?",
        "{name} gives {b} {things} to each of {a} friends. How many {things} does {name} give away?",
    ),
}


def _check_range(name: str, value: Sequence[int]) -> tuple[int, int]:
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be two integers [low, high], got {value!r}")
    low, high = int(value[0]), int(value[1])
    if low < 0 or high < low:
        raise ValueError(f"{name} must satisfy 0 <= low <= high, got [{low}, {high}]")
    return low, high


def arithmetic_problem(
    index: int,
    seed: int = 0,
    *,
    operations: Sequence[str] = OPERATIONS,
    operand_range: Sequence[int] = (1, 20),
    multiply_range: Sequence[int] = (2, 12),
) -> dict[str, Any]:
    """The ``index``-th problem of the stream ``seed``: ``{id, question, reference, rationale, operation, operands}``.

    Each problem has its own generator seeded with ``(seed, index)``, so a problem does not depend
    on how many are drawn. Subtraction puts the larger operand first (answers are never negative);
    multiplication draws both operands from ``multiply_range``.
    """
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty list of {', '.join(OPERATIONS)}, got {list(operations)!r}")
    low, high = _check_range("operand_range", operand_range)
    mlow, mhigh = _check_range("multiply_range", multiply_range)
    rng = random.Random(f"arithmetic:{seed}:{index}")
    operation = rng.choice(list(operations))
    if operation == "*":
        a, b = rng.randint(mlow, mhigh), rng.randint(mlow, mhigh)
        result = a * b
    else:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if operation == "-" and b > a:
            a, b = b, a
        result = a + b if operation == "+" else a - b
    name, pronoun = rng.choice(NAMES)
    things = rng.choice(OBJECTS)
    question = rng.choice(TEMPLATES[operation]).format(name=name, pronoun=pronoun, things=things, a=a, b=b)
    return {
        "id": f"arithmetic-{seed}-{index}",
        "question": question,
        "reference": str(result),
        "rationale": f"{a} {SYMBOLS[operation]} {b} = {result}.\nAnswer: {result}",
        "operation": operation,
        "operands": [a, b],
    }


def arithmetic_problems(
    count: int,
    seed: int = 0,
    *,
    operations: Sequence[str] = OPERATIONS,
    operand_range: Sequence[int] = (1, 20),
    multiply_range: Sequence[int] = (2, 12),
    unique: bool = True,
    exclude: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """``count`` arithmetic word problems (see :func:`arithmetic_problem`), deterministic in ``seed``.

    With ``unique`` a problem whose question was already drawn is skipped; questions in ``exclude``
    are always skipped (pass the training questions to draw a disjoint evaluation set). The first
    ``k`` problems of ``count >= k`` are the ``k`` problems of ``count = k``. Raises ``ValueError``
    when the settings allow fewer distinct problems than asked for.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    seen = set(exclude)
    problems: list[dict[str, Any]] = []
    index = 0
    budget = 20 * count + 1000
    while len(problems) < count:
        if index >= budget:
            raise ValueError(
                f"only {len(problems)} distinct arithmetic problems found in {budget} draws (asked for {count}); "
                "widen operand_range / multiply_range or add operations"
            )
        problem = arithmetic_problem(
            index, seed, operations=operations, operand_range=operand_range, multiply_range=multiply_range
        )
        index += 1
        if problem["question"] in seen:
            continue
        if unique:
            seen.add(problem["question"])
        problems.append(problem)
    return problems


def arithmetic_chat_records(
    problems: Sequence[dict[str, Any]], *, template: str = "{question}", system: str | None = None
) -> list[dict[str, Any]]:
    """``chat_jsonl`` records (``prompt``/``completion`` = gold rationale, optional ``system``) of problems."""
    records = []
    for problem in problems:
        record: dict[str, Any] = {"id": problem["id"], "prompt": template.format(question=problem["question"])}
        if system is not None:
            record["system"] = system
        record.update({"completion": problem["rationale"], "reference": problem["reference"]})
        records.append(record)
    return records


def write_arithmetic_chat_jsonl(
    path: str | os.PathLike[str],
    count: int,
    seed: int = 0,
    *,
    template: str = "{question}",
    system: str | None = None,
    exclude: Iterable[str] = (),
    **options: Any,
) -> list[dict[str, Any]]:
    """Write ``count`` arithmetic problems with their gold rationales as a ``chat_jsonl`` file (atomically).

    Each line is ``{"id", "prompt", "completion", "reference"}`` (and ``"system"`` when given):
    ``prompt`` is ``template`` with ``{question}`` filled in, ``completion`` the gold rationale
    ending in ``Answer: N``. ``exclude`` (questions) and ``options`` (``operations``,
    ``operand_range``, ``multiply_range``, ``unique``) are those of :func:`arithmetic_problems`;
    a held-out file drawn with ``exclude=[p["question"] for p in train]`` shares no question with
    the training file. Returns the problems written.
    """
    problems = arithmetic_problems(count, seed, exclude=exclude, **options)
    records = arithmetic_chat_records(problems, template=template, system=system)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return problems


def arithmetic_items(count: int, seed: int = 0, **options: Any) -> list[PromptItem]:
    """The arithmetic problems as :class:`PromptItem` objects (the ``task: arithmetic`` source)."""
    return [
        PromptItem(
            id=problem["id"], question=problem["question"], reference=problem["reference"],
            source={"task": "arithmetic", "seed": seed, "index": int(problem["id"].rsplit("-", 1)[1])},
        )
        for problem in arithmetic_problems(count, seed, **options)
    ]


# --------------------------------------------------------------------------------------------
# Seed prompts from JSONL
# --------------------------------------------------------------------------------------------


def expand_files(files: str | Sequence[str], key: str) -> list[Path]:
    """Files named by paths and globs (``**`` allowed), in the order given, each glob sorted.

    A name that matches nothing is an error naming ``key``.
    """
    entries = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not entries:
        raise ValueError(f"{key}: give at least one file or glob")
    found: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(os.fspath(entry))
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{key}: the pattern '{entry}' matches no files")
            found.extend(matches)
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            raise FileNotFoundError(f"{key}: '{entry}' does not exist (resolved to '{os.path.abspath(text)}')")
    return found


def _scalar_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: '{name}' must be a string or a number, got {value!r}")
    return str(value)


def read_seed_prompts(
    files: str | Sequence[str], *, field: str = "prompt", reference_field: str | None = None, id_field: str | None = None,
) -> list[PromptItem]:
    """Prompts from JSONL files: ``field`` holds the question, ``reference_field`` (optional) its answer,
    ``id_field`` (optional, default ``<file name>:<line>``) a unique id. Errors name ``file:line``."""
    items: list[PromptItem] = []
    ids: dict[str, str] = {}
    for path, number, record in iter_user_jsonl(expand_files(files, "source.prompts.files")):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in (field, reference_field, id_field):
            if name is not None and name not in record:
                raise ValueError(f"{where}: no field '{name}' (the object has keys {sorted(record)})")
        question = record[field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: '{field}' must be a non-empty string, got {question!r}")
        reference = _scalar_text(record[reference_field], where, reference_field) if reference_field else None
        item_id = _scalar_text(record[id_field], where, id_field) if id_field else f"{path.name}:{number}"
        if item_id in ids:
            raise ValueError(f"{where}: id '{item_id}' was already used at {ids[item_id]}; ids must be unique")
        ids[item_id] = where
        items.append(PromptItem(item_id, question=question, reference=reference,
                                source={"file": str(path), "line": number}))
    if not items:
        raise ValueError(f"source.prompts.files: no prompts in {files!r}")
    return items


# --------------------------------------------------------------------------------------------
# Documents (MechGPT): chunks and question-answer pairs
# --------------------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\S(?:.*?\S)?(?=\n[ \t]*\n|\s*\Z)", re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    """A piece of a document: ``text == document[start:end]``."""

    index: int
    start: int
    end: int
    text: str


def _segments(text: str, limit: int) -> list[tuple[int, int]]:
    """(start, end) of each paragraph; a paragraph longer than ``limit`` is cut into sentences, and
    a sentence longer than ``limit`` at spaces (or hard at ``limit`` when it has none)."""
    segments: list[tuple[int, int]] = []
    for match in _PARAGRAPH.finditer(text):
        start, end = match.span()
        if end - start <= limit:
            segments.append((start, end))
            continue
        pieces: list[tuple[int, int]] = []
        cursor = start
        for boundary in _SENTENCE_END.finditer(text, start, end):
            pieces.append((cursor, boundary.start()))
            cursor = boundary.end()
        pieces.append((cursor, end))
        for piece_start, piece_end in pieces:
            while piece_end - piece_start > limit:
                cut = text.rfind(" ", piece_start + 1, piece_start + limit)
                cut = cut if cut > piece_start else piece_start + limit
                segments.append((piece_start, cut))
                piece_start = cut
                while piece_start < piece_end and text[piece_start].isspace():
                    piece_start += 1
            if piece_end > piece_start:
                segments.append((piece_start, piece_end))
    return segments


def chunk_document(text: str, chunk_chars: int = 2000, overlap_chars: int = 200) -> list[Chunk]:
    """Cut ``text`` into chunks of whole paragraphs, at most ``chunk_chars`` characters each.

    Paragraphs (separated by blank lines) are packed greedily. A paragraph longer than
    ``chunk_chars`` is split into sentences (and an over-long sentence at spaces). Consecutive
    chunks overlap by the trailing paragraphs (or sentences) of the previous chunk that fit in
    ``overlap_chars`` in total; when even the last one is longer, chunks do not overlap. Offsets
    index the text as given, so ``text[chunk.start:chunk.end] == chunk.text``.
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    if not 0 <= overlap_chars < chunk_chars:
        raise ValueError(f"overlap_chars must be >= 0 and < chunk_chars ({chunk_chars}), got {overlap_chars}")
    segments = _segments(text, chunk_chars)
    chunks: list[Chunk] = []
    first = 0
    while first < len(segments):
        last = first
        while last + 1 < len(segments) and segments[last + 1][1] - segments[first][0] <= chunk_chars:
            last += 1
        start, end = segments[first][0], segments[last][1]
        chunks.append(Chunk(len(chunks), start, end, text[start:end]))
        if last + 1 >= len(segments):
            break
        following = last + 1
        for candidate in range(first + 1, last + 1):
            if end - segments[candidate][0] <= overlap_chars:
                following = candidate
                break
        first = following
    return chunks


def read_document(path: Path) -> str:
    return read_user_text(path)


def document_items(files: str | Sequence[str], *, chunk_chars: int, overlap_chars: int) -> list[PromptItem]:
    """One :class:`PromptItem` per chunk of every document, with its provenance
    (``file``, ``chunk``, ``start``, ``end``) and the id ``<file>#<chunk>``."""
    items: list[PromptItem] = []
    for path in expand_files(files, "source.documents.files"):
        for chunk in chunk_document(read_document(path), chunk_chars, overlap_chars):
            items.append(PromptItem(
                f"{path}#{chunk.index}", document=chunk.text,
                source={"file": str(path), "chunk": chunk.index, "start": chunk.start, "end": chunk.end},
            ))
    if not items:
        raise ValueError(f"source.documents.files: the documents {files!r} hold no text")
    return items


_QA_LINE = re.compile(
    r"^\s*(?:[-*>#]+\s*)?(?:\(?\d{1,3}[.):]\s*)?(?:\*\*|__)?"
    r"(?P<tag>Q(?:uestion)?|A(?:nswer)?)\s*(?:\d{1,3})?\s*(?:\*\*|__)?\s*:\s*(?:\*\*|__)?\s*(?P<text>.*)$",
    re.IGNORECASE,
)


def parse_qa_pairs(text: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs from text written as ``Q: ...`` / ``A: ...`` lines.

    Accepts ``Question:``/``Answer:``, numbering (``1. Q:``, ``Q1:``), list markers and markdown
    bold around the tag; a question or answer may continue over following lines. A question with no
    answer, an answer with no question and empty parts are ignored, as is text before the first
    tag. At most ``limit`` pairs are returned, in order.
    """
    pairs: list[tuple[str, str]] = []
    question: list[str] | None = None
    answer: list[str] | None = None

    def close() -> None:
        nonlocal question, answer
        if question is not None and answer is not None:
            q, a = " ".join(" ".join(question).split()), " ".join(" ".join(answer).split())
            if q and a:
                pairs.append((q, a))
        question, answer = None, None

    for line in text.splitlines():
        match = _QA_LINE.match(line)
        if match is not None and match.group("tag")[0].upper() == "Q":
            close()
            question = [match.group("text")]
        elif match is not None:  # an answer tag
            if question is None or answer is not None:
                close()  # an answer without its question, or a second answer: dropped
                continue
            answer = [match.group("text")]
        elif answer is not None:
            if not line.strip():
                close()
            else:
                answer.append(line.strip())
        elif question is not None and line.strip():
            question.append(line.strip())
    close()
    return pairs[:limit] if limit is not None else pairs
