"""Preference pairs for DCKD / ADPA (``preference_jsonl``): a prompt with a chosen and a rejected reply.

Each JSONL line is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (optionally ``"system"``).
Both replies are encoded like :func:`distill.data.text.chat_jsonl` examples (the tokenizer's chat
template, loss on the reply tokens only) and stacked along a pair dimension:

* inputs ``[N, 2, T]`` token ids, right-padded: ``[:, 0]`` the prompt + chosen reply, ``[:, 1]``
  the prompt + rejected reply;
* labels ``[N, 2, T]``, shifted targets as everywhere else (``-100`` on the prompt and padding).

The engine runs the models on the ``2N`` sequences and hands the losses ``[B, 2, T, V]`` logits,
the layout :mod:`distill.losses.preference` expects. YAML::

    data:
      dataset: preference_jsonl
      params: {files: data/pairs.jsonl, tokenizer: smollm2-135m-instruct, max_length: 256}
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from distill.data.base import ArraySplit, RawDataset
from distill.data.text import (
    ChatExample,
    _check_chat,
    _encode_chat,
    _encode_plain,
    _expand_files,
    _lm_meta,
    _pad,
    get_tokenizer,
    iter_jsonl,
)
from distill.registry import DATASETS

FIELDS = ("prompt", "chosen", "rejected")


def read_preference_jsonl(paths: Sequence[Path]) -> list[tuple[ChatExample, ChatExample]]:
    """(chosen, rejected) examples from JSONL files; errors name ``file:line``."""
    pairs: list[tuple[ChatExample, ChatExample]] = []
    for where, record in iter_jsonl(paths):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(record).__name__}")
        missing = [field for field in FIELDS if not isinstance(record.get(field), str) or not record[field]]
        if missing:
            raise ValueError(
                f"{where}: {', '.join(repr(m) for m in missing)} must be "
                f"{'a non-empty string' if len(missing) == 1 else 'non-empty strings'}; "
                f"a preference pair needs {', '.join(FIELDS)} (the object has keys {sorted(record)})"
            )
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{where}: 'system' must be a string")
        pairs.append(
            (
                ChatExample(where, prompt=record["prompt"], completion=record["chosen"], system=system),
                ChatExample(where, prompt=record["prompt"], completion=record["rejected"], system=system),
            )
        )
    if not pairs:
        raise ValueError(f"no preference pairs in {', '.join(str(p) for p in paths)}")
    return pairs


def _encode_pairs(
    pairs: list[tuple[ChatExample, ChatExample]], tokenizer: Any, source: str, *, max_length: int, truncate: bool,
    chat_template: bool, what: str,
) -> list[tuple[Any, Any]]:
    encode = (lambda examples: _encode_chat(tokenizer, examples, source)) if chat_template else (
        lambda examples: _encode_plain(tokenizer, examples)
    )
    chosen = encode([c for c, _ in pairs])
    rejected = encode([r for _, r in pairs])
    kept, dropped = [], 0
    for pair in zip(chosen, rejected):
        if max(len(ids) for ids, _ in pair) > max_length:
            if not truncate:
                dropped += 1
                continue
            pair = tuple((ids[:max_length], targets[:max_length]) for ids, targets in pair)  # type: ignore[assignment]
            if not all(any(targets) for _, targets in pair):
                dropped += 1
                continue
        kept.append(pair)
    if dropped:
        warnings.warn(
            f"preference_jsonl: dropped {dropped} of {len(pairs)} {what} pairs with a reply longer than "
            f"max_length={max_length} tokens (or cut to no reply token)",
            stacklevel=3,
        )
    if not kept:
        raise ValueError(f"preference_jsonl: no {what} pair fits in max_length={max_length} tokens")
    return kept


def _stack(pairs: list[tuple[Any, Any]], length: int, pad_id: int) -> ArraySplit:
    chosen = _pad([c for c, _ in pairs], length, pad_id)
    rejected = _pad([r for _, r in pairs], length, pad_id)
    return ArraySplit(torch.stack([chosen.inputs, rejected.inputs], 1), torch.stack([chosen.labels, rejected.labels], 1))


@DATASETS.register("preference_jsonl", summary="Preference pairs (prompt, chosen, rejected) from JSONL, as [N, 2, T] tokens.")
def preference_jsonl(
    *,
    files: str | list[str],
    tokenizer: str,
    max_length: int = 256,
    truncate: bool = False,
    chat_template: bool = True,
    test_files: str | list[str] | None = None,
) -> RawDataset:
    """Preference pairs from JSONL files (``files``: a path, glob, folder of ``*.jsonl`` or a list;
    ``test_files`` make the test split, else ``data.test_fraction`` holds pairs out).

    A pair whose longer reply exceeds ``max_length`` tokens is dropped (counted in one warning) or,
    with ``truncate: true``, cut. Chosen and rejected sequences are padded to one length.
    """
    _check_chat(max_length, truncate, chat_template)
    tok, token_hash = get_tokenizer(tokenizer)
    splits = {"train": read_preference_jsonl(_expand_files(files, "files", "*.jsonl"))}
    if test_files is not None:
        splits["test"] = read_preference_jsonl(_expand_files(test_files, "test_files", "*.jsonl"))
    encoded = {
        name: _encode_pairs(pairs, tok, tokenizer, max_length=max_length, truncate=truncate, chat_template=chat_template, what=name)
        for name, pairs in splits.items()
    }
    length = max(len(ids) for pairs in encoded.values() for pair in pairs for ids, _ in pair)
    arrays = {name: _stack(pairs, length, int(tok.pad_token_id)) for name, pairs in encoded.items()}
    return RawDataset(
        "preference_jsonl", arrays["train"], arrays.get("test"), len(tok), [], task="lm",
        meta=_lm_meta(tokenizer, tok, token_hash, pairs=True),
    )
