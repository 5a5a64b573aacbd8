"""Text classification data (wordnet_lexnames, text_classification_jsonl) and the text_classifier student."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from distill.config import load_experiment
from distill.data import load_data
from distill.data.text import WORDNET_ROOT
from distill.data.text_classification import (
    LEXNAMES,
    read_wordnet_synsets,
    text_classification_jsonl,
    wordnet_lexnames,
)
from distill.engine.runner import run_experiment
from distill.models.build import build_model
from distill.models.text import text_classifier
from tests.wordnet_fixtures import EASY, needs_wordnet

pytestmark = [pytest.mark.usefixtures("single_thread"), needs_wordnet]


def _category_of_texts() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        for lexnum, _, definition in read_wordnet_synsets(Path(WORDNET_ROOT) / f"data.{pos}"):
            out.setdefault(definition, set()).add(LEXNAMES[lexnum])
    return out


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


# ---------------------------------------------------------------------------------- wordnet_lexnames


def test_lexnames_splits_are_disjoint_per_class_and_labelled_with_the_true_category(words: str) -> None:
    categories = ["noun.animal", "noun.motive", "verb.weather"]
    raw = wordnet_lexnames(tokenizer=words, categories=categories, per_class_train=5, val_per_class=4, test_per_class=6)
    val = wordnet_lexnames(tokenizer=words, categories=categories, per_class_train=5, val_per_class=4, test_per_class=6, heldout="val")
    assert raw.class_names == categories and raw.num_classes == 3 and raw.task == "classification"
    assert Counter(raw.train.labels.tolist()) == {0: 5, 1: 5, 2: 5}
    assert Counter(raw.test.labels.tolist()) == {0: 6, 1: 6, 2: 6}
    assert Counter(val.test.labels.tolist()) == {0: 4, 1: 4, 2: 4}
    assert torch.equal(val.train.inputs, raw.train.inputs)  # heldout changes only the held-out split
    train, test, held = (set(raw.meta["texts"]["train"]), set(raw.meta["texts"]["test"]), set(val.meta["texts"]["test"]))
    assert len(train) == 15 and len(test) == 18 and len(held) == 12
    assert not train & test and not train & held and not test & held
    truth = _category_of_texts()
    for texts, labels in ((raw.meta["texts"]["train"], raw.train.labels), (raw.meta["texts"]["test"], raw.test.labels),
                          (val.meta["texts"]["test"], val.test.labels)):
        for text, label in zip(texts, labels.tolist()):
            assert truth[text] == {categories[label]}
    assert raw.meta["class_counts"]["noun.motive"]["available"] < 45  # a small category: 42 synsets in WordNet 3.0


def test_per_class_train_subsamples_the_pool_and_never_moves_the_test_set(words: str) -> None:
    full = wordnet_lexnames(tokenizer=words, categories=["noun.motive", "noun.Tops"], val_per_class=5, test_per_class=5)
    sparse = wordnet_lexnames(tokenizer=words, categories=["noun.motive", "noun.Tops"], val_per_class=5, test_per_class=5,
                              per_class_train=3)
    other_seed = wordnet_lexnames(tokenizer=words, categories=["noun.motive", "noun.Tops"], val_per_class=5, test_per_class=5,
                                  per_class_train=3, seed=1)
    assert torch.equal(full.test.inputs, sparse.test.inputs)
    assert set(sparse.meta["texts"]["train"]) < set(full.meta["texts"]["train"])
    counts = full.meta["class_counts"]
    assert len(full.train.labels) == sum(c["available"] - c["val"] - c["test"] for c in counts.values())
    assert sparse.meta["texts"]["train"] != other_seed.meta["texts"]["train"]


def test_lexnames_tokenizes_right_padded_int64_and_can_prefix_the_word(words: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from tests.lm_fixtures import build_tokenizer

    raw = wordnet_lexnames(tokenizer=words, categories=["noun.plant"], per_class_train=4, test_per_class=3,
                           val_per_class=0, with_word=True, max_length=40)
    tokenizer = AutoTokenizer.from_pretrained(words)
    assert raw.train.inputs.dtype == torch.int64 and raw.train.inputs.shape == (4, 40)
    assert raw.meta["pad_token_id"] == tokenizer.pad_token_id == 0 and raw.meta["vocab_size"] == len(tokenizer)
    for row, text in zip(raw.train.inputs, raw.meta["texts"]["train"]):
        word, _, definition = text.partition(": ")
        assert word and definition
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert row[: len(ids)].tolist() == ids and (row[len(ids):] == 0).all()
    build_tokenizer(tmp_path / "bpe")  # byte-level BPE: every definition is longer than 4 tokens
    with pytest.warns(UserWarning, match="cut 7 of 7 texts to max_length=4 tokens"):
        cut = wordnet_lexnames(tokenizer=str(tmp_path / "bpe"), categories=["noun.plant"], per_class_train=4,
                               test_per_class=3, val_per_class=0, max_length=4)
    assert cut.train.inputs.shape == (4, 4) and cut.meta["truncated"] == 7


def test_lexnames_parameter_errors_name_the_parameter(words: str) -> None:
    with pytest.raises(ValueError, match=r"data.params.categories: unknown category 'noun.animals'.*did you mean 'noun.animal'"):
        wordnet_lexnames(tokenizer=words, categories=["noun.animals"])
    with pytest.raises(ValueError, match=r"'verb.motion' is a category of verb synsets, which data.params.pos \(noun\) leaves out"):
        wordnet_lexnames(tokenizer=words, pos=["noun"], categories=["verb.motion"])
    with pytest.raises(ValueError, match=r"data.params.pos: unknown part of speech 'nouns'"):
        wordnet_lexnames(tokenizer=words, pos=["nouns"])
    with pytest.raises(ValueError, match="heldout is 'val' but data.params.val_per_class is 0"):
        wordnet_lexnames(tokenizer=words, categories=["noun.plant"], val_per_class=0, heldout="val")
    with pytest.raises(ValueError, match="data.params.heldout must be one of test, val"):
        wordnet_lexnames(tokenizer=words, heldout="train")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_lexnames(tokenizer=words, root="/nonexistent")


def test_extra_train_rows_are_appended_with_their_labels(words: str, tmp_path: Path) -> None:
    first = _write_jsonl(tmp_path / "a.jsonl", [
        {"text": "a small striped wild cat of the forest", "label": "noun.animal", "round": 0, "target": "noun.animal"},
        {"text": "a sweet red fruit of a climbing plant", "label": "noun.plant"},
    ])
    second = _write_jsonl(tmp_path / "b.jsonl", ["", {"text": "a dish of boiled rice and beans", "label": "noun.food"}])
    base = wordnet_lexnames(tokenizer=words, categories=EASY, per_class_train=3, test_per_class=3, val_per_class=2)
    raw = wordnet_lexnames(tokenizer=words, categories=EASY, per_class_train=3, test_per_class=3, val_per_class=2,
                           extra_train=[str(first), str(second)])
    assert len(raw.train) == len(base.train) + 3 == 15
    assert torch.equal(raw.train.inputs[:12], base.train.inputs) and torch.equal(raw.test.inputs, base.test.inputs)
    assert raw.train.labels[12:].tolist() == [EASY.index("noun.animal"), EASY.index("noun.plant"), EASY.index("noun.food")]
    assert raw.meta["texts"]["train"][12:] == ["a small striped wild cat of the forest", "a sweet red fruit of a climbing plant",
                                               "a dish of boiled rice and beans"]
    assert (raw.meta["labelled_train"], raw.meta["extra_train"]) == (12, 3)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    assert len(wordnet_lexnames(tokenizer=words, categories=EASY, per_class_train=3, test_per_class=3, val_per_class=2,
                                extra_train=str(empty)).train) == 12


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "a cat", "label": "noun.animl"}', r"unknown label 'noun.animl'.*did you mean 'noun.animal'"),
        ('{"text": "a cat", "label": ', "not valid JSON"),
        ('{"txt": "a cat", "label": "noun.animal"}', "has no 'text'"),
        ('{"text": "   ", "label": "noun.animal"}', "'text' is empty"),
        ('{"text": "a cat", "label": ["noun.animal"]}', "'label' must be a class name"),
        ('["a cat", "noun.animal"]', "expected a JSON object"),
    ],
)
def test_bad_extra_train_lines_name_file_and_line(words: str, tmp_path: Path, line: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "extra.jsonl", [{"text": "a fine cat", "label": "noun.animal"}, "", line])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: .*{message}"):
        wordnet_lexnames(tokenizer=words, categories=EASY, per_class_train=2, test_per_class=2, val_per_class=1,
                         extra_train=str(path))


def test_missing_extra_train_file_is_an_error(words: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.params.extra_train: .*missing.jsonl' does not exist"):
        wordnet_lexnames(tokenizer=words, categories=EASY, extra_train=str(tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------- text_classification_jsonl


def test_jsonl_builder_maps_label_names_to_ids_and_serves_its_validation_set(words: str, tmp_path: Path) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a loud bird of the forest", "label": "animal"}, {"text": "a tall tree with broad leaves", "label": "plant"},
        {"text": "a fish of warm seas", "label": "animal"}, {"message": "a cooked dish", "topic": "food"},
    ])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "a small grey mouse", "label": "animal"}])
    test = _write_jsonl(tmp_path / "test.jsonl", [{"text": "a flowering shrub", "label": "plant"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(train))}:4: the object has no 'text'"):
        text_classification_jsonl(files=str(train), tokenizer=words)
    train = _write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a loud bird of the forest", "label": "animal"}, {"text": "a tall tree with broad leaves", "label": "plant"},
        {"text": "a fish of warm seas", "label": "animal"}, {"text": "a cooked dish", "label": "food"},
    ])
    raw = text_classification_jsonl(files=str(train), tokenizer=words, val_files=str(val), test_files=str(test), max_length=12)
    assert raw.class_names == ["animal", "food", "plant"]
    assert raw.train.labels.tolist() == [0, 2, 0, 1] and raw.test.labels.tolist() == [2]
    assert raw.train.inputs.shape == (4, 12) and raw.meta["heldout"] == "test"
    held = text_classification_jsonl(files=str(train), tokenizer=words, val_files=str(val), test_files=str(test), heldout="val")
    assert held.test.labels.tolist() == [0] and held.meta["texts"]["test"] == ["a small grey mouse"]
    fixed = text_classification_jsonl(files=str(train), tokenizer=words, classes=["plant", "food", "animal", "mineral"],
                                      extra_train=[str(val)])
    assert fixed.num_classes == 4 and fixed.train.labels.tolist() == [2, 0, 2, 1, 2] and fixed.test is None
    stone = _write_jsonl(tmp_path / "stone.jsonl", [{"text": "a hard grey stone", "label": "mineral"}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(stone))}:1: unknown label 'mineral' in data.params.extra_train"):
        text_classification_jsonl(files=str(train), tokenizer=words, extra_train=str(stone))
    with pytest.raises(ValueError, match="val_files is not set"):
        text_classification_jsonl(files=str(train), tokenizer=words, heldout="val")


# ---------------------------------------------------------------------------------- through the engine


def _experiment(words: str, tmp_path: Path, **changes: object) -> dict:
    experiment = {
        "name": "lexnames",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "dataset": "wordnet_lexnames",
            "params": {"tokenizer": words, "categories": EASY, "per_class_train": 60, "val_per_class": 0,
                       "test_per_class": 50, "max_length": 32},
            "batch_size": 32,
            "val_fraction": 0.0,
        },
        "models": {"student": {"arch": "text_classifier", "params": {"tokenizer": words}}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "training": {"epochs": 8},
        "evaluation": {"latency": False, "every_epochs": 8},
        "stages": [{"name": "student", "model": "student", "objective": {"terms": [{"loss": "cross_entropy"}]}}],
    }
    experiment.update(changes)
    return experiment


def test_the_student_learns_an_easy_subset_through_the_engine(words: str, tmp_path: Path) -> None:
    experiment = load_experiment(_experiment(words, tmp_path))
    data = load_data(experiment.data)
    assert data.input_shape == (32,) and data.train.inputs.dtype == torch.int64 and data.mean is None
    assert len(data.train) == 240 and len(data.test) == 200
    result = run_experiment(experiment, write_report=False)
    row = next(r for r in result.rows if r["name"] == "student")
    assert row["test"]["accuracy"] > 0.55  # 4 classes: chance is 0.25
    assert row["best"]["test"]["accuracy"] >= row["test"]["accuracy"] - 0.1


# ---------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("encoder", ["bag", "cnn", "transformer"])
def test_logits_ignore_padding_and_depend_on_the_tokens(encoder: str) -> None:
    torch.manual_seed(0)
    model = text_classifier(num_classes=3, input_shape=(20,), vocab_size=50, pad_token_id=0, encoder=encoder, dropout=0.0).eval()
    ids = torch.zeros(4, 20, dtype=torch.int64)
    ids[0, :5] = torch.tensor([5, 6, 7, 8, 9])
    ids[1, :2] = torch.tensor([11, 12])
    ids[2, :12] = torch.arange(20, 32)
    # row 3 is empty
    with torch.no_grad():
        logits = model(ids)
        shorter = model(ids[:, :12])
        single = model(ids[1:2, :2])
        changed = model(torch.where(ids == 6, torch.tensor(40), ids))
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(shorter, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single, logits[1:2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed[0], logits[0]) and torch.allclose(changed[1:], logits[1:], atol=1e-6)


def test_the_model_reads_its_vocabulary_from_the_tokenizer_and_checks_token_ids(words: str) -> None:
    from distill.config.schema import ModelSpec

    model = build_model(ModelSpec(arch="text_classifier", params={"tokenizer": words, "dim": 8}), num_classes=4, input_shape=(16,))
    assert model.embedding.num_embeddings == 4000 and model.pad_token_id == 0
    with pytest.raises(ValueError, match="token ids span 0..4000 but the model's vocabulary has 4000 ids"):
        model(torch.tensor([[4000, 0]]))
    with pytest.raises(TypeError, match="takes token ids"):
        model(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="set params.tokenizer to the data's tokenizer source"):
        text_classifier(num_classes=2, input_shape=(8,))
    with pytest.raises(ValueError, match="takes token ids"):
        text_classifier(num_classes=2, input_shape=(3, 8, 8), vocab_size=10, pad_token_id=0)
    with pytest.raises(ValueError, match="encoder must be one of bag, cnn, transformer"):
        text_classifier(num_classes=2, input_shape=(8,), vocab_size=10, pad_token_id=0, encoder="lstm")
