"""A multi-domain language-modelling corpus whose rows carry their domain: the data of DDK.

Registered in :data:`distill.registry.DATASETS`:

* ``domain_text``: documents from several domains (Shakespeare's works, WordNet glosses, Debian
  fortune categories), each domain packed into its own fixed-length token blocks; every row's
  ``groups`` entry is the index of its domain in ``meta["domains"]``.

DDK (Liu et al., 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models")
re-weights the sampling of domains by the teacher-student gap measured on per-domain validation
data; :mod:`distill.engine.ddk` holds that part. Nothing here downloads anything: every domain is
read from files that installed packages ship.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.base import ArraySplit, RawDataset
from distill.data.text import (
    WORDNET_APT,
    WORDNET_POS,
    WORDNET_ROOT,
    _check_bool,
    _check_int,
    _lm_meta,
    _packed_split,
    _read_text,
    _wordnet_pairs,
    get_tokenizer,
    shakespeare_texts_folder,
    strip_gutenberg,
)
from distill.registry import DATASETS, did_you_mean

FORTUNES_ROOT = "/usr/share/games/fortunes"
FORTUNES_APT = "apt-get install -y fortunes"

DEFAULT_DOMAINS = ("shakespeare", "wordnet", "fortunes:computers", "fortunes:science", "fortunes:songs-poems")
"""The domains of ``domain_text`` by default: literature in verse and prose, dictionary glosses, and
three fortune categories with the most text whose topics differ (computing jokes and quotes,
science quotes, verse)."""

_OVERSTRIKE = re.compile(".\x08")
_SHAKESPEARE_CACHE: dict[tuple[str, tuple[tuple[str, int, float], ...]], list[str]] = {}
_FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)


@dataclass
class _Domain:
    """The documents (units) of one domain: ``units`` builds them; ``joiner`` is None when each unit
    is its own document (EOS between units), else the string that joins the units of a split into
    one document (WordNet gloss lines)."""

    name: str
    units: Callable[[], list[str]]
    joiner: str | None = None


def fortune_categories(root: str | os.PathLike[str] = FORTUNES_ROOT) -> list[str]:
    """The fortune category files in ``root``, sorted (the ``.dat`` indexes and ``.u8`` links skipped)."""
    folder = Path(os.path.expanduser(os.fspath(root)))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the fortunes are not installed: {folder} is not a folder. Install them with `{FORTUNES_APT}` "
            f"(Debian package 'fortunes'), or set data.params.fortunes_root"
        )
    return sorted(
        path.name for path in folder.iterdir()
        if path.is_file() and not path.is_symlink() and "." not in path.name
    )


def read_fortunes(path: str | os.PathLike[str]) -> list[str]:
    """The entries of a fortune file (separated by lines holding a single ``%``), in file order,
    without overstrike sequences (``char + backspace``, the files' way to underline) and surrounding
    blank lines; empty entries are dropped. Read as UTF-8, undecodable bytes replaced."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = _OVERSTRIKE.sub("", handle.read())
    entries = (entry.strip("\n") for entry in _FORTUNE_SEPARATOR.split(text))
    return [entry.rstrip() + "\n" for entry in entries if entry.strip()]


def _shakespeare_domain(root: str | None) -> _Domain:
    def units() -> list[str]:
        folder = shakespeare_texts_folder(root)
        paths = sorted(folder.glob("*_gut.txt"))
        key = (str(folder.resolve()), tuple((path.name, path.stat().st_size, path.stat().st_mtime) for path in paths))
        if key not in _SHAKESPEARE_CACHE:  # stripping the licences of 42 works takes a while: once per process
            _SHAKESPEARE_CACHE[key] = [strip_gutenberg(_read_text(path)) for path in paths]
        return list(_SHAKESPEARE_CACHE[key])

    return _Domain("shakespeare", units)


def _wordnet_domain(root: str) -> _Domain:
    def units() -> list[str]:
        folder = Path(os.path.expanduser(root))
        missing = [str(folder / f"data.{pos}") for pos in WORDNET_POS if not (folder / f"data.{pos}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"WordNet files not found: {', '.join(missing)}. Install WordNet 3.0 with `{WORDNET_APT}` "
                f"(files go to {WORDNET_ROOT}), or set data.params.wordnet_root"
            )
        lines: dict[str, None] = {}  # ordered set: duplicate lines would leak between train and test
        for pos in WORDNET_POS:
            for word, definition in _wordnet_pairs(folder, pos, False):
                lines.setdefault(f"{word}: {definition}", None)
        return list(lines)

    return _Domain("wordnet", units, joiner="\n")


def _fortunes_domain(name: str, root: str, category: str | None) -> _Domain:
    def units() -> list[str]:
        available = fortune_categories(root)
        if category is not None and category not in available:
            raise ValueError(
                f"data.params.domains: no fortune category '{category}' in {root}"
                f"{did_you_mean(category, available)}; the categories are {', '.join(available)}"
            )
        entries: list[str] = []
        for file_name in [category] if category is not None else available:
            entries.extend(read_fortunes(Path(os.path.expanduser(root)) / file_name))
        return entries

    return _Domain(name, units)


def _resolve(name: Any, shakespeare_root: str | None, wordnet_root: str, fortunes_root: str) -> _Domain:
    if not isinstance(name, str):
        raise TypeError(f"data.params.domains: every entry must be a domain name, got {name!r}")
    if name == "shakespeare":
        return _shakespeare_domain(shakespeare_root)
    if name == "wordnet":
        return _wordnet_domain(wordnet_root)
    if name == "fortunes":
        return _fortunes_domain(name, fortunes_root, None)
    if name.startswith("fortunes:") and name[len("fortunes:"):]:
        return _fortunes_domain(name, fortunes_root, name[len("fortunes:"):])
    known = ["shakespeare", "wordnet", "fortunes", *DEFAULT_DOMAINS]
    raise ValueError(
        f"data.params.domains: unknown domain {name!r}{did_you_mean(name, known)}; the domains are "
        "'shakespeare', 'wordnet', 'fortunes' (every fortune category as one domain) and "
        "'fortunes:<category>' (one category, e.g. 'fortunes:computers')"
    )


def _held_out(units: list[str], fraction: float, seed: int, name: str) -> tuple[list[str], list[str]]:
    """``(train, test)`` units: a permutation seeded by ``(seed, name)`` puts the first
    ``max(1, round(fraction * n))`` units in test (at most ``n - 1``) and the rest, in that shuffled
    order, in train. Deterministic across processes and platforms (NumPy's PCG64 seeded from a
    sha256 of the seed and the domain name)."""
    if len(units) < 2:
        raise ValueError(f"domain '{name}' has {len(units)} document(s); at least 2 are needed for a train and a test split")
    digest = hashlib.sha256(f"distill-domain-text:{seed}:{name}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(units)).tolist()
    count = min(len(units) - 1, max(1, int(fraction * len(units) + 0.5)))
    return [units[i] for i in order[count:]], [units[i] for i in order[:count]]


def _documents(units: list[str], joiner: str | None) -> list[str]:
    return units if joiner is None else [joiner.join(units) + joiner]


@DATASETS.register(
    "domain_text",
    summary="Documents of several domains (Shakespeare, WordNet glosses, fortunes) in token blocks; rows carry their domain.",
)
def domain_text(
    *,
    tokenizer: str,
    block_size: int = 128,
    domains: Sequence[str] | None = None,
    max_blocks_per_domain: int | None = 2000,
    test_fraction: float = 0.1,
    seed: int = 0,
    add_eos: bool = True,
    prompt_tokens: int | None = None,
    shakespeare_root: str | None = None,
    wordnet_root: str = WORDNET_ROOT,
    fortunes_root: str = FORTUNES_ROOT,
) -> RawDataset:
    """A language-modelling corpus of several domains, each packed into blocks of ``block_size``
    tokens, whose rows carry ``groups`` = the domain's index in ``domains`` (``meta["domains"]``).

    ``domains`` (default :data:`DEFAULT_DOMAINS`) picks among:

    * ``shakespeare``: the works of the ``shakespeare`` package (one document per work, Project
      Gutenberg header and licence removed; ``shakespeare_root`` reads another folder of ``*_gut.txt``);
    * ``wordnet``: WordNet 3.0 glosses as ``word: first definition`` lines, one per synset of
      ``data.{noun,verb,adj,adv}`` (Debian ``wordnet-base`` at ``wordnet_root``), duplicates dropped;
      the lines of a split are joined by newlines into one document;
    * ``fortunes``: every category of the Debian ``fortunes`` package (``fortunes_root``) as one
      domain; ``fortunes:<category>`` (e.g. ``fortunes:computers``): one category. Each fortune (an
      entry between ``%`` lines, overstrike removed) is one document.

    The test split is held out per domain and by document, so no test text is trained on and every
    domain is in test: a permutation seeded by ``(seed, domain)`` sends ``test_fraction`` of the
    domain's documents (at least one) to test; the rest, in that shuffled order, are for training.
    Each side is tokenized and packed like the ``text`` data set (EOS between documents when
    ``add_eos``; the last block of each domain may be right-padded). ``max_blocks_per_domain`` caps
    each domain's blocks: ``round(test_fraction * cap)`` (at least 1) for test and the rest for
    training, taken from the start of the shuffled documents (only that much text is tokenized);
    null packs everything. Validation data comes from ``data.val_fraction`` of the training split,
    which :func:`distill.data.splits.prepare` draws stratified by domain, so it holds every domain too.

    ``meta``: the tokenizer fields of every language-model data set, ``domains`` (names, in group
    order), ``domain_blocks`` (``{name: {"train": n, "test": m}}``) and ``tokens`` (per split).
    """
    _check_int("block_size", block_size, 2)
    _check_int("max_blocks_per_domain", max_blocks_per_domain, 2, optional=True)
    _check_int("seed", seed, 0)
    _check_int("prompt_tokens", prompt_tokens, 1, optional=True)
    _check_bool("add_eos", add_eos)
    if prompt_tokens is not None and prompt_tokens >= block_size:
        raise ValueError(f"data.params.prompt_tokens ({prompt_tokens}) must be smaller than block_size ({block_size})")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"data.params.test_fraction must be a fraction between 0 and 1 (exclusive), got {test_fraction!r}")
    if domains is None:
        domains = DEFAULT_DOMAINS
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, (list, tuple)) or not domains:
        raise ValueError(f"data.params.domains must be a non-empty list of domain names, got {domains!r}")
    names = list(domains)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"data.params.domains lists {', '.join(map(repr, repeated))} more than once")
    resolved = [_resolve(name, shakespeare_root, wordnet_root, fortunes_root) for name in names]

    test_blocks = train_blocks = None
    if max_blocks_per_domain is not None:
        test_blocks = min(max_blocks_per_domain - 1, max(1, int(test_fraction * max_blocks_per_domain + 0.5)))
        train_blocks = max_blocks_per_domain - test_blocks
    tok, token_hash = get_tokenizer(tokenizer)

    parts: dict[str, list[ArraySplit]] = {"train": [], "test": []}
    blocks: dict[str, dict[str, int]] = {}
    tokens = {"train": 0, "test": 0}
    for index, domain in enumerate(resolved):
        train_units, test_units = _held_out(domain.units(), test_fraction, seed, domain.name)
        blocks[domain.name] = {}
        for split, units, cap in (("train", train_units, train_blocks), ("test", test_units, test_blocks)):
            documents = _documents(units, domain.joiner)
            packed, count = _packed_split(
                iter(documents), tok, block_size=block_size,
                max_tokens=None if cap is None else cap * block_size, add_eos=add_eos,
                total_chars=sum(len(document) for document in documents),
                what=f"domain '{domain.name}' ({split})",
            )
            parts[split].append(ArraySplit(packed.inputs, packed.labels, torch.full((len(packed),), index, dtype=torch.int64)))
            blocks[domain.name][split] = len(packed)
            tokens[split] += count

    def concatenated(splits: list[ArraySplit]) -> ArraySplit:
        return ArraySplit(
            torch.cat([part.inputs for part in splits]),
            torch.cat([part.labels for part in splits]),
            torch.cat([part.groups for part in splits]),  # type: ignore[misc]
        )

    meta = _lm_meta(
        tokenizer, tok, token_hash, prompt_tokens=prompt_tokens or block_size // 2, domains=names,
        domain_blocks=blocks, tokens=tokens,
    )
    return RawDataset(
        "domain_text", concatenated(parts["train"]), concatenated(parts["test"]), len(tok), [], task="lm", meta=meta
    )


def domain_names(meta: dict[str, Any]) -> list[str]:
    """``meta["domains"]`` of a data set with grouped rows; a clear error when it has none."""
    names = meta.get("domains")
    if not isinstance(names, list) or not names:
        raise ValueError(
            "the data set does not name its domains (meta['domains']); a domain mixture needs a data set "
            "whose rows carry groups, such as 'domain_text'"
        )
    return [str(name) for name in names]


__all__ = ["DEFAULT_DOMAINS", "domain_names", "domain_text", "fortune_categories", "read_fortunes"]
