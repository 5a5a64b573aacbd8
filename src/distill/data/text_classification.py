"""Text classification data sets: labelled texts as token ids, with room for generated training examples.

Registered in :data:`distill.registry.DATASETS`:

* ``wordnet_lexnames``: WordNet 3.0 definitions labelled with their lexicographer category
  (``noun.animal``, ``verb.motion``, ... 45 classes), with a fixed, disjoint test set, a fixed
  validation set and an optionally sparse training set (``per_class_train`` labelled examples per
  class, the setting of performance-guided distillation);
* ``text_classification_jsonl``: ``{"text": ..., "label": ...}`` lines from JSONL files.

Both return a classification :class:`~distill.data.base.RawDataset` whose inputs are token ids
``[N, max_length]`` int64, right-padded with the tokenizer's pad id (longer texts are cut to
``max_length`` tokens; no special tokens are added), and whose labels ``[N]`` are class indices into
``class_names``. ``meta`` records ``tokenizer`` (its source), ``tokenizer_hash``, ``pad_token_id``,
``vocab_size`` (``len(tokenizer)``), ``max_length``, ``heldout``, the row counts, and ``texts``:
the raw texts of the ``train`` and ``test`` rows, in row order (what a loop that writes prompts
about the data, such as :mod:`distill.pgkd`, shows to a teacher).

Two parameters serve loops that grow the training set:

* ``extra_train``: JSONL files whose ``{"text", "label"}`` lines (label = a class name; other keys,
  e.g. provenance, are ignored) are appended to the training split after the labelled rows
  (``meta["labelled_train"]`` rows come first, ``meta["extra_train"]`` rows after them). This is how
  the examples a teacher generates enter training.
* ``heldout``: which held-out set the data set returns as its test split, ``test`` (default) or
  ``val``. A data set's own validation set cannot be handed to the engine (which carves
  ``data.val_fraction`` of the training rows at random, a draw that changes as the training split
  grows), so a loop that needs a *fixed* validation set trains with ``data.val_fraction: 0`` and
  reads the validation set as the test split of a second call with ``heldout: val``.

The ``tokenizer`` parameter is a source string as understood by
:func:`distill.models.causal_lm.load_tokenizer` (an alias such as ``smollm2-135m-instruct``, a
``.gguf`` file, a local folder or a hub id); it must load a fast tokenizer with a pad (or EOS) token.
Nothing here downloads data.
"""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.base import ArraySplit, RawDataset
from distill.data.text import (
    WORDNET_POS,
    WORDNET_ROOT,
    _check_bool,
    _check_int,
    _expand_files,
    _lemma,
    _short,
    _tokenize,
    check_wordnet_pos,
    get_tokenizer,
    iter_jsonl,
    iter_wordnet_data,
    wordnet_folder,
)
from distill.registry import DATASETS, did_you_mean

LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
"""WordNet 3.0's lexicographer files, indexed by the ``lex_filenum`` field of a ``data.<pos>`` line
(the ``lexnames`` file of the WordNet distribution, which Debian's ``wordnet-base`` does not ship)."""

HELDOUT = ("test", "val")

_SYNSET_CACHE: dict[tuple[str, int, float], list[tuple[int, str, str]]] = {}


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledText:
    """One example: its text, its class name and where it came from (``file:line``, ``WordNet <pos> <offset>``)."""

    text: str
    label: str
    where: str


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, int]:
    """Token ids ``[N, max_length]`` int64 of ``texts``, right-padded with the pad id, cut at ``max_length``.

    No special tokens are added. Returns the ids and the number of texts that were cut.
    """
    pad = int(tokenizer.pad_token_id)
    ids = np.full((len(texts), max_length), pad, dtype=np.int64)
    cut = 0
    for row, tokens in enumerate(_tokenize(tokenizer, list(texts))):
        if len(tokens) > max_length:
            cut += 1
            tokens = tokens[:max_length]
        ids[row, : len(tokens)] = tokens
    return torch.from_numpy(ids), cut


def read_labelled_jsonl(
    paths: Sequence[Path], *, text_field: str = "text", label_field: str = "label"
) -> list[LabelledText]:
    """``{text_field: str, label_field: str | int}`` objects from JSONL files (blank lines skipped).

    Other keys are ignored. Errors name ``file:line``: bad JSON, a non-object, a missing or
    non-string text, an empty text, a missing label or one that is neither a string nor an integer.
    """
    examples: list[LabelledText] = []
    for where, record in iter_jsonl(paths):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with '{text_field}' and '{label_field}', got {type(record).__name__}")
        for key in (text_field, label_field):
            if key not in record:
                raise ValueError(f"{where}: the object has no '{key}'{did_you_mean(key, list(record))}; its keys: {sorted(record)}")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: '{text_field}' must be a string, got {_short(text)}")
        if not text.strip():
            raise ValueError(f"{where}: '{text_field}' is empty")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{where}: '{label_field}' must be a class name (a string), got {_short(label)}")
        examples.append(LabelledText(text.strip(), str(label), where))
    return examples


def _class_ids(examples: Sequence[LabelledText], class_names: Sequence[str], what: str) -> torch.Tensor:
    index = {name: i for i, name in enumerate(class_names)}
    ids = []
    for example in examples:
        if example.label not in index:
            shown = ", ".join(class_names[:12]) + (f", ... ({len(class_names)} in all)" if len(class_names) > 12 else "")
            raise ValueError(
                f"{example.where}: unknown label '{example.label}'{did_you_mean(example.label, list(class_names))} in {what}; "
                f"the classes are {shown}"
            )
        ids.append(index[example.label])
    return torch.tensor(ids, dtype=torch.int64)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"data.params.{name} must be one of {', '.join(choices)}, got {value!r}")


def _extra_examples(extra_train: Any) -> list[LabelledText]:
    if extra_train is None:
        return []
    if isinstance(extra_train, (list, tuple)) and not extra_train:
        return []
    return read_labelled_jsonl(_expand_files(extra_train, "extra_train", "*.jsonl"))


def build_classification(
    name: str,
    *,
    train: Sequence[LabelledText],
    extra: Sequence[LabelledText],
    test: Sequence[LabelledText] | None,
    class_names: Sequence[str],
    tokenizer: str,
    max_length: int,
    heldout: str,
    **meta: Any,
) -> RawDataset:
    """Tokenize labelled examples into a classification :class:`RawDataset` (see the module docs).

    ``train`` (labelled) rows come first, ``extra`` rows after them; ``test`` may be None (the
    engine then carves ``data.test_fraction``). Extra labels must name one of ``class_names``.
    """
    if not train:
        raise ValueError(f"{name}: the training split has no examples")
    tok, token_hash = get_tokenizer(tokenizer)
    rows = list(train) + list(extra)
    labels = torch.cat([_class_ids(train, class_names, "the training data"), _class_ids(extra, class_names, "data.params.extra_train")])
    inputs, cut = encode_texts(tok, [example.text for example in rows], max_length)
    test_split = None
    test_cut = 0
    if test is not None:
        if not test:
            raise ValueError(f"{name}: the {heldout} split has no examples")
        test_inputs, test_cut = encode_texts(tok, [example.text for example in test], max_length)
        test_split = ArraySplit(test_inputs, _class_ids(test, class_names, f"the {heldout} data"))
    if cut or test_cut:
        warnings.warn(
            f"{name}: cut {cut + test_cut} of {len(rows) + len(test or [])} texts to max_length={max_length} tokens",
            stacklevel=3,
        )
    info = {
        "tokenizer": tokenizer,
        "tokenizer_hash": token_hash,
        "pad_token_id": int(tok.pad_token_id),
        "vocab_size": len(tok),
        "max_length": max_length,
        "heldout": heldout,
        "labelled_train": len(train),
        "extra_train": len(extra),
        "truncated": cut + test_cut,
        "texts": {"train": [example.text for example in rows], "test": [example.text for example in test or []]},
        **meta,
    }
    return RawDataset(name, ArraySplit(inputs, labels), test_split, len(class_names), list(class_names), meta=info)


def _check_common(tokenizer: Any, max_length: Any, heldout: Any) -> None:
    if not isinstance(tokenizer, str) or not tokenizer.strip():
        raise ValueError(f"data.params.tokenizer must be a tokenizer source string, got {tokenizer!r}")
    _check_int("max_length", max_length, 1)
    _check_choice("heldout", heldout, HELDOUT)


# --------------------------------------------------------------------------------------------
# WordNet lexicographer categories
# --------------------------------------------------------------------------------------------


def read_wordnet_synsets(path: str | os.PathLike[str]) -> list[tuple[int, str, str]]:
    """(lex_filenum, first lemma, first definition) of every synset of a WordNet ``data.<pos>`` file.

    The definition is that of :func:`distill.data.text.first_definition` (the gloss before its first
    ``;``, without quoted examples); synsets whose gloss holds no definition are skipped, as in
    :func:`distill.data.text.read_wordnet`. Malformed lines raise an error naming ``file:line``.
    """
    file = Path(path)
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime)
    if key in _SYNSET_CACHE:
        return _SYNSET_CACHE[key]
    synsets = [
        (lexnum, _lemma(word), definition)
        for (lexnum, word), definition in iter_wordnet_data(file, _lexname_and_word)
    ]
    _SYNSET_CACHE[key] = synsets
    return synsets


def _lexname_and_word(parts: list[str]) -> tuple[int, str]:
    lexnum = int(parts[1])
    if not 0 <= lexnum < len(LEXNAMES):
        raise ValueError(f"lexicographer file number {parts[1]} is not one of 00..{len(LEXNAMES) - 1}")
    if int(parts[3], 16) < 1:
        raise ValueError("a synset without words")
    return lexnum, parts[4]


def _class_rng(seed: int, name: str) -> random.Random:
    digest = hashlib.sha256(f"distill-lexnames:{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@DATASETS.register(
    "wordnet_lexnames",
    summary="WordNet 3.0 definitions labelled with their lexicographer category (up to 45 classes); sparse training labels.",
)
def wordnet_lexnames(
    *,
    tokenizer: str,
    pos: Sequence[str] = WORDNET_POS,
    categories: Sequence[str] | None = None,
    per_class_train: int | None = None,
    val_per_class: int = 20,
    test_per_class: int = 40,
    with_word: bool = False,
    max_length: int = 64,
    heldout: str = "test",
    extra_train: str | list[str] | None = None,
    seed: int = 0,
    root: str = WORDNET_ROOT,
) -> RawDataset:
    """WordNet definitions classified into their lexicographer category (``noun.animal``, ``verb.motion``, ...).

    Reads ``<root>/data.{noun,verb,adj,adv}`` (Debian package ``wordnet-base``) for the parts of speech
    in ``pos``; one example per synset: its first definition (:func:`read_wordnet_synsets`), or
    ``"<first lemma>: <definition>"`` with ``with_word: true``. The label is the synset's lexicographer
    file; the classes are ``categories`` in the order given, or every category of ``pos``, in WordNet's
    file-number order. A text that occurs under two categories is dropped; repeats under one are kept once.

    Splits are drawn per class from a shuffle seeded by ``(seed, category)`` and are disjoint:
    ``test_per_class`` examples go to the test set, then ``val_per_class`` to the validation set
    (each at most a third of the class), and the rest is the training pool, of which
    ``per_class_train`` examples are kept (null: all) -- a sparsely annotated training set. Changing
    ``per_class_train`` or ``val_per_class`` never moves an example into or out of the test set.

    ``heldout: val`` returns the validation set as the test split (see the module docs);
    ``extra_train`` appends ``{"text", "label"}`` JSONL examples to the training split.
    """
    _check_common(tokenizer, max_length, heldout)
    pos = check_wordnet_pos(pos)
    _check_int("per_class_train", per_class_train, 1, optional=True)
    _check_int("val_per_class", val_per_class, 0)
    _check_int("test_per_class", test_per_class, 1)
    _check_int("seed", seed, 0)
    _check_bool("with_word", with_word)
    if heldout == "val" and val_per_class == 0:
        raise ValueError("data.params.heldout is 'val' but data.params.val_per_class is 0: there is no validation set")
    available = [name for name in LEXNAMES if name.split(".")[0] in pos]
    if categories is None:
        class_names = available
    else:
        if isinstance(categories, str) or not isinstance(categories, (list, tuple)) or not categories:
            raise ValueError(f"data.params.categories must be a non-empty list of category names, got {categories!r}")
        for name in categories:
            if name not in LEXNAMES:
                raise ValueError(
                    f"data.params.categories: unknown category {name!r}{did_you_mean(str(name), LEXNAMES)}; "
                    f"WordNet's categories: {', '.join(LEXNAMES)}"
                )
            if name not in available:
                raise ValueError(
                    f"data.params.categories: '{name}' is a category of {name.split('.')[0]} synsets, which "
                    f"data.params.pos ({', '.join(pos)}) leaves out"
                )
        if len(set(categories)) != len(categories):
            raise ValueError(f"data.params.categories lists a category twice: {list(categories)}")
        class_names = list(categories)
    folder = wordnet_folder(root, pos)
    wanted = {LEXNAMES.index(name): name for name in class_names}
    texts: dict[str, list[tuple[str, str]]] = {name: [] for name in class_names}  # category -> (text, where)
    labels_of: dict[str, set[str]] = {}
    for part in pos:
        for index, (lexnum, word, definition) in enumerate(read_wordnet_synsets(folder / f"data.{part}")):
            text = f"{word}: {definition}" if with_word else definition
            labels_of.setdefault(text, set()).add(LEXNAMES[lexnum])
            if lexnum in wanted:
                texts[wanted[lexnum]].append((text, f"WordNet data.{part} synset {index}"))
    split: dict[str, list[LabelledText]] = {"train": [], "val": [], "test": []}
    counts: dict[str, dict[str, int]] = {}
    for name in class_names:
        seen: set[str] = set()
        unique = []
        for text, where in texts[name]:
            if len(labels_of[text]) == 1 and text not in seen:
                seen.add(text)
                unique.append(LabelledText(text, name, where))
        if len(unique) < 3:
            raise ValueError(
                f"wordnet_lexnames: category '{name}' has {len(unique)} usable synsets; at least 3 are needed "
                "(one each for train, val and test)"
            )
        _class_rng(seed, name).shuffle(unique)
        n_test = min(test_per_class, len(unique) // 3)
        n_val = min(val_per_class, len(unique) // 3)
        pool = unique[n_test + n_val :]
        kept = pool if per_class_train is None else pool[:per_class_train]
        split["test"] += unique[:n_test]
        split["val"] += unique[n_test : n_test + n_val]
        split["train"] += kept
        counts[name] = {"train": len(kept), "val": n_val, "test": n_test, "available": len(unique)}
    return build_classification(
        "wordnet_lexnames",
        train=split["train"],
        extra=_extra_examples(extra_train),
        test=split[heldout],
        class_names=class_names,
        tokenizer=tokenizer,
        max_length=max_length,
        heldout=heldout,
        class_counts=counts,
    )


# --------------------------------------------------------------------------------------------
# JSONL files
# --------------------------------------------------------------------------------------------


@DATASETS.register(
    "text_classification_jsonl",
    summary="Labelled texts from JSONL files ({text, label} lines) as token ids; extra training files appended.",
)
def text_classification_jsonl(
    *,
    files: str | list[str],
    tokenizer: str,
    val_files: str | list[str] | None = None,
    test_files: str | list[str] | None = None,
    extra_train: str | list[str] | None = None,
    classes: list[str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    max_length: int = 64,
    heldout: str = "test",
) -> RawDataset:
    """Labelled texts from JSONL files, one ``{"text": ..., "label": ...}`` object per line.

    ``files`` make the training split; ``test_files`` the test split (without them the engine holds
    out ``data.test_fraction`` of the training rows); ``val_files`` a fixed validation set, returned
    as the test split with ``heldout: val`` (see the module docs). Each is a path, a glob, a folder
    (its ``*.jsonl`` files) or a list. ``text_field``/``label_field`` name the keys; a label is a
    class name (an integer label is taken as its decimal name). The classes are ``classes`` in the
    order given, or the sorted label names found in ``files``, ``val_files`` and ``test_files``.
    ``extra_train`` files are appended to the training split; their labels must be known classes.
    Malformed lines raise an error naming ``file:line``.
    """
    _check_common(tokenizer, max_length, heldout)
    for name, value in (("text_field", text_field), ("label_field", label_field)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"data.params.{name} must be a key name, got {value!r}")
    if heldout == "val" and val_files is None:
        raise ValueError("data.params.heldout is 'val' but data.params.val_files is not set: there is no validation set")

    def read(entry: Any, name: str) -> list[LabelledText]:
        return read_labelled_jsonl(_expand_files(entry, name, "*.jsonl"), text_field=text_field, label_field=label_field)

    train = read(files, "files")
    val = read(val_files, "val_files") if val_files is not None else None
    test = read(test_files, "test_files") if test_files is not None else None
    if classes is None:
        class_names = sorted({example.label for part in (train, val or [], test or []) for example in part})
    else:
        if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes:
            raise ValueError(f"data.params.classes must be a non-empty list of class names, got {classes!r}")
        class_names = [str(name) for name in classes]
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"data.params.classes lists a class twice: {class_names}")
    if len(class_names) < 2:
        raise ValueError(f"text_classification_jsonl: the data has {len(class_names)} class(es) ({class_names}); at least 2 are needed")
    return build_classification(
        "text_classification_jsonl",
        train=train,
        extra=_extra_examples(extra_train),
        test=val if heldout == "val" else test,
        class_names=class_names,
        tokenizer=tokenizer,
        max_length=max_length,
        heldout=heldout,
    )
