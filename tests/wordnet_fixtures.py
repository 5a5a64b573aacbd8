"""Shared pieces of the tests on WordNet text classification: a skip mark, four easy classes, a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.data.text import WORDNET_ROOT
from distill.data.text_classification import read_wordnet_synsets

needs_wordnet = pytest.mark.skipif(
    not Path(WORDNET_ROOT, "data.noun").is_file(), reason="WordNet (wordnet-base) is not installed"
)

EASY = ["noun.animal", "noun.plant", "noun.food", "noun.person"]
"""Four lexicographer categories a small student tells apart in a few epochs."""


def build_word_tokenizer(folder: Path, size: int = 4000) -> Path:
    """A word-level fast tokenizer (lower case, ``[PAD]`` id 0, ``[UNK]`` id 1) trained on WordNet noun and
    verb definitions, saved to ``folder``: whole words make the small student learn in a few epochs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [d for pos in ("noun", "verb") for _, _, d in read_wordnet_synsets(Path(WORDNET_ROOT) / f"data.{pos}")]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=size, special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    return folder
