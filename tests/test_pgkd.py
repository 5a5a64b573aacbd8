"""Performance-guided distillation (PGKD): prompts, parsing, the round loop with a scripted teacher, early stopping."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from distill.config import ConfigError, load_experiment
from distill.data import load_data
from distill.data.text_classification import wordnet_lexnames
from distill.io import read_jsonl
from distill.models.build import build_model, load_weights
from distill.pgkd import (
    PGKDSpec,
    TeacherSpec,
    add_pgkd_parser,
    command_pgkd,
    filter_examples,
    hard_negatives,
    load_pgkd_experiment,
    normalized,
    parse_examples,
    parse_label,
    per_class_report,
    run_pgkd,
    split_budget,
    teacher_problems,
    weakest_classes,
)
from tests.conftest import ROOT
from tests.wordnet_fixtures import EASY as CLASSES
from tests.wordnet_fixtures import needs_wordnet

pytestmark = [pytest.mark.usefixtures("single_thread"), needs_wordnet]

PARAMS = {"categories": CLASSES, "per_class_train": 6, "val_per_class": 15, "test_per_class": 20, "max_length": 32}


@pytest.fixture(scope="module")
def pool(words: str) -> dict[str, list[str]]:
    """Per class, real WordNet definitions of the class outside the data set's train, val and test sets:
    what a faithful teacher could write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few long definitions are cut to max_length: irrelevant here
        everything = wordnet_lexnames(tokenizer=words, **{**PARAMS, "per_class_train": None})
    used = set(wordnet_lexnames(tokenizer=words, **PARAMS).meta["texts"]["train"])
    out: dict[str, list[str]] = {name: [] for name in CLASSES}
    for text, label in zip(everything.meta["texts"]["train"], everything.train.labels.tolist()):
        if text not in used:
            out[CLASSES[label]].append(text)
    return out


def experiment_dict(words: str, tmp_path: Path, **pgkd: Any) -> dict[str, Any]:
    return {
        "name": "pgkd_test",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "wordnet_lexnames", "params": {"tokenizer": words, **PARAMS}, "batch_size": 16, "val_fraction": 0.0},
        "models": {"student": {"arch": "text_classifier", "params": {"tokenizer": words, "dim": 32}}},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "training": {"epochs": 6},
        "evaluation": {"latency": False},
        "stages": [{"name": "student", "model": "student", "objective": {"terms": [{"loss": "cross_entropy"}]}}],
        "pgkd": {"teacher": {"model": "scripted-llm", "base_url": "http://127.0.0.1:9/v1"}, "stage": "student", **pgkd},
    }


def load(words: str, tmp_path: Path, **pgkd: Any) -> tuple[Any, PGKDSpec]:
    path = tmp_path / "pgkd.yaml"
    path.write_text(yaml.safe_dump(experiment_dict(words, tmp_path, **pgkd), sort_keys=False))
    return load_pgkd_experiment(path)


class ScriptedTeacher:
    """Stands in for ``TeacherClient``: answers generation requests with ``write(target, count, round_seen)``
    and classification requests with ``classify(text)``; records every request."""

    def __init__(self, write: Callable[[str, int], str], classify: Callable[[str], str] | None = None) -> None:
        self.write = write
        self.classify = classify
        self.calls: list[list[dict[str, Any]]] = []

    def map(self, kind: str, requests: list[dict[str, Any]], progress: Any = None) -> list[dict[str, Any]]:
        assert kind == "chat"
        self.calls.append(requests)
        responses = []
        for request in requests:
            content = request["messages"][-1]["content"]
            if content.endswith("Reply with the category name only."):
                assert self.classify is not None
                reply = self.classify(re.search(r"^Text: (.*)$", content, re.MULTILINE).group(1))
            else:
                match = re.search(r'Your task: write (\d+) new texts of the category "([^"]+)"', content)
                reply = self.write(match.group(2), int(match.group(1)))
            choice = {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
            responses.append({"object": "chat.completion", "choices": [choice] * request["n"]})
        if progress is not None:
            progress(len(requests), len(requests))
        return responses

    def requests(self, kind: str = "generate") -> list[dict[str, Any]]:
        classify = [r for call in self.calls for r in call if r["messages"][-1]["content"].endswith("category name only.")]
        return classify if kind == "classify" else [r for call in self.calls for r in call if r not in classify]


def from_pool(pool: dict[str, list[str]]) -> Callable[[str, int], str]:
    """A faithful teacher: ``count`` unused real definitions of the class, numbered, never the same twice."""
    used: dict[str, int] = {}

    def write(target: str, count: int) -> str:
        start = used.get(target, 0)
        used[target] = start + count
        return "Here are new texts:\n" + "\n".join(f"{i + 1}. {text}" for i, text in enumerate(pool[target][start : start + count]))

    return write


def student_val_probs(run_dir: Path, words: str) -> tuple[torch.Tensor, Any]:
    from distill.config.schema import ModelSpec

    val = wordnet_lexnames(tokenizer=words, **PARAMS, heldout="val")
    model = build_model(ModelSpec(arch="text_classifier", params={"tokenizer": words, "dim": 32}), num_classes=4, input_shape=(32,))
    load_weights(model, run_dir / "stages" / "student" / "model.safetensors")
    with torch.no_grad():
        return torch.softmax(model.eval()(val.test.inputs).double(), dim=1), val


# ---------------------------------------------------------------------------------- pure pieces


def test_per_class_report_matches_a_hand_computed_confusion() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 0, 1])
    probs = torch.full((6, 4), 0.1, dtype=torch.float64)
    probs[torch.arange(6), predicted] = 0.7
    report = per_class_report(probs, labels, ["a", "b", "c", "d"])
    a, b, c, d = report["classes"]
    assert (a["precision"], a["recall"]) == pytest.approx((2 / 3, 2 / 3)) and a["f1"] == pytest.approx(2 / 3)
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert d["recall"] is None and d["f1"] is None and d["support"] == 0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.0) / 3)
    assert report["accuracy"] == pytest.approx(3 / 6) and report["nll"] == pytest.approx(-torch.tensor(0.7).log().item() * 0.5
                                                                                        - torch.tensor(0.1).log().item() * 0.5)
    assert report["confusion"][0] == [2, 1, 0, 0] and report["confusion"][2] == [0, 1, 0, 0]
    assert weakest_classes(report, 2) == [2, 1]  # d has no support: never targeted
    assert split_budget(10, 4) == [3, 3, 2, 2] and split_budget(3, 4) == [1, 1, 1, 0]


def test_hard_negatives_are_the_most_confident_mistakes_in_each_direction() -> None:
    probs = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9], [0.7, 0.3], [0.95, 0.05], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    texts = [f"t{i}" for i in range(6)]
    missed, intruders = hard_negatives(probs, labels, 0, 2, texts, ["x", "y"])
    assert [m["text"] for m in missed] == ["t2", "t0"] and all(m["predicted"] == "y" and m["label"] == "x" for m in missed)
    assert missed[0]["confidence"] == 0.9
    assert [m["text"] for m in intruders] == ["t4", "t3"] and intruders[0]["label"] == "y"


def test_replies_are_parsed_from_lines_or_json_and_cleaned() -> None:
    reply = 'Sure! Here are 4 texts:\n\n1. "a large wild cat"\n2) a small bird\n- Example 3: a tree frog\n```\n\u2022 a grey seal\n```'
    assert parse_examples(reply) == ["a large wild cat", "a small bird", "a tree frog", "a grey seal"]
    assert parse_examples('Here you go: ["a horse", {"text": "an owl"}, 7]') == ["a horse", "an owl"]
    assert parse_examples('["unclosed, "list"\nsecond line') == ['["unclosed, "list"', "second line"]
    assert parse_examples("") == [] and parse_examples("Texts:\n\n") == []


def test_filtering_drops_short_long_heldout_copies_and_duplicates() -> None:
    seen = {normalized("A domestic cat.")}
    kept, dropped = filter_examples(
        ["a domestic cat", "a wild dog", "A  wild dog!", "dog", "x " * 300, "the held out text", "a new bird",
         'Texts of the category "Noun.Animal":', "a noun.animals fan", "an animal of the plains"],
        seen=seen, heldout={normalized("The held-out text")} | {"the held out text"}, max_chars=100, min_words=2,
        class_names=["noun.animal", "noun.plant"],
    )
    assert kept == ["a wild dog", "a new bird", "a noun.animals fan", "an animal of the plains"]
    assert [reason for _, reason in dropped] == [
        "duplicate", "duplicate", "too_short", "too_long", "copies_heldout", "names_a_class",
    ]
    assert normalized("a new bird") in seen


def test_labels_are_read_from_the_teachers_answer() -> None:
    names = ["noun.act", "noun.action_x", "verb.act"]
    assert parse_label(" Noun.Act. ", names) == "noun.act"
    assert parse_label("The category is **verb.act**", names) == "verb.act"
    assert parse_label("noun.action_x, not noun.act", names) == "noun.action_x"
    assert parse_label("I cannot tell", names) is None


def test_the_spec_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="classes_per_rounds"):
        PGKDSpec.model_validate({"teacher": {"model": "m"}, "stage": "s", "classes_per_rounds": 3})
    with pytest.raises(ValidationError, match="metric"):
        PGKDSpec.model_validate({"teacher": {"model": "m"}, "stage": "s", "metric": "f1"})
    spec = PGKDSpec.model_validate({"teacher": {"serve": {"model": "smollm2-135m-instruct"}, "timeout_s": 30}, "stage": "s"})
    assert spec.teacher.serve.model == "smollm2-135m-instruct" and spec.teacher.endpoint_fields() == {"timeout_s": 30}
    assert teacher_problems(spec.teacher) == []
    problems = teacher_problems(TeacherSpec.model_validate({"base_url": "http://127.0.0.1:8000/v1", "timeout": 3}))
    assert problems[0][0] == ("pgkd", "teacher", "timeout") and "did you mean 'timeout_s'" in problems[0][1]
    problems = teacher_problems(TeacherSpec.model_validate({"base_url": "ftp://host/v1"}))
    assert problems[0][0] == ("pgkd", "teacher", "base_url") and "http:// or https://" in problems[0][1]
    assert "give the endpoint's base_url" in teacher_problems(TeacherSpec.model_validate({"model": "m"}))[0][1]
    both = TeacherSpec.model_validate({"serve": {"model": "m"}, "base_url": "http://127.0.0.1:8000/v1"})
    assert teacher_problems(both) == [(("pgkd", "teacher", "base_url"), "give either serve (a local server) or base_url (an endpoint), not both")]


def test_loading_names_the_line_and_key_at_fault(words: str, tmp_path: Path) -> None:
    data = experiment_dict(words, tmp_path)
    data["pgkd"]["stage"] = "studnt"
    data["pgkd"]["per_rounds"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"pgkd.per_rounds: unknown key \(did you mean 'per_round'\?\)"):
        load_pgkd_experiment(path)
    del data["pgkd"]["per_rounds"]
    data["data"]["params"]["heldout"] = "val"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        load_pgkd_experiment(path)
    message = str(error.value)
    assert re.search(r"line \d+: pgkd.stage: no stage 'studnt' \(did you mean 'student'\?\)", message)
    data["pgkd"]["stage"] = "student"
    (tmp_path / "w.safetensors").write_bytes(b"")  # only its existence is checked when loading
    data["models"]["big"] = {"arch": "text_classifier", "params": {"tokenizer": words}, "weights": str(tmp_path / "w.safetensors")}
    data["stages"][0]["teacher"] = "big"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        load_pgkd_experiment(path, ["data.params.heldout=test"])
    message = str(error.value)
    assert re.search(r"line \d+: pgkd.stage: stage 'student' reads a teacher model", message)
    assert re.search(r"data.params.heldout: PGKD sets it itself", message)


def test_the_shipped_example_is_valid() -> None:
    experiment, spec = load_pgkd_experiment(ROOT / "examples" / "pgkd_wordnet.yaml")
    assert experiment.data.dataset == "wordnet_lexnames" and experiment.models[experiment.stage(spec.stage).model].arch == "text_classifier"
    assert spec.teacher.serve is not None and spec.teacher.serve.model == "smollm2-135m-instruct"
    assert experiment.data.val_fraction == 0.0


# ---------------------------------------------------------------------------------- the loop


def test_the_prompt_targets_the_weakest_classes_and_shows_their_hard_negatives(
    words: str, pool: dict[str, list[str]], tmp_path: Path
) -> None:
    experiment, spec = load(words, tmp_path, rounds=1, per_round=4, classes_per_round=2, hard_negatives=3, examples_per_class=2)
    teacher = ScriptedTeacher(from_pool(pool))
    result = run_pgkd(experiment, spec=spec, output_dir=tmp_path / "out", client=teacher)
    probs, val = student_val_probs(tmp_path / "out" / "round-0" / "run", words)
    texts = val.meta["texts"]["test"]
    predicted, labels = probs.argmax(1), val.test.labels
    f1 = []
    for c in range(4):
        tp = int(((predicted == c) & (labels == c)).sum())
        precision = tp / max(int((predicted == c).sum()), 1)
        recall = tp / int((labels == c).sum())
        f1.append((2 * precision * recall / (precision + recall) if tp else 0.0, recall, c))
    expected = [c for _, _, c in sorted(f1)[:2]]
    requests = teacher.requests()
    assert len(requests) == 2 and result.result["rounds"][0]["generation"]["targets"] == [CLASSES[c] for c in expected]
    train_texts = set(wordnet_lexnames(tokenizer=words, **PARAMS).meta["texts"]["train"])
    for request, target in zip(requests, expected):
        prompt = request["messages"][-1]["content"]
        assert f'write 2 new texts of the category "{CLASSES[target]}"' in prompt
        assert "Its weakest categories now are: " + ", ".join(f"{CLASSES[c]} (F1 {f1[c][0]:.2f})" for c in expected) in prompt
        for name in CLASSES:  # the full validation report
            assert re.search(rf"- {re.escape(name)}: precision \d\.\d\d, recall \d\.\d\d, F1 \d\.\d\d, 15 validation texts", prompt)
        missed = [(float(probs[i].max()), i) for i in range(len(labels)) if labels[i] == target and predicted[i] != target]
        assert missed, "a student trained on 6 examples per class misses some validation texts"
        shown = sorted(missed, key=lambda item: -item[0])[:3]
        for _, row in shown:
            assert f'- "{texts[row]}" (classified as {CLASSES[int(predicted[row])]})' in prompt
        hidden = sorted(missed, key=lambda item: -item[0])[3:]
        assert all(f'"{texts[row]}" (classified' not in prompt for _, row in hidden)
        intruders = [i for i in range(len(labels)) if labels[i] != target and predicted[i] == target]
        for row in sorted(intruders, key=lambda i: -float(probs[i].max()))[:3]:
            assert f'- "{texts[row]}" (really {CLASSES[int(labels[row])]})' in prompt
        examples = re.search(rf'Texts of the category "{re.escape(CLASSES[target])}" from the training data:\n((?:- .*\n)+)', prompt)
        assert examples and all(line[2:] in train_texts for line in examples.group(1).splitlines())
        assert request["temperature"] == 0.8 and request["n"] == 1 and request["max_tokens"] == 512
    prompts = json.loads((tmp_path / "out" / "round-0" / "prompts.json").read_text())
    assert [p["messages"] for p in prompts] == [r["messages"] for r in requests]


def test_generated_examples_are_cleaned_labelled_and_trained_on_in_the_next_round(
    words: str, pool: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labelled = wordnet_lexnames(tokenizer=words, **PARAMS)
    val_texts = wordnet_lexnames(tokenizer=words, **PARAMS, heldout="val").meta["texts"]["test"]

    def messy(target: str, count: int) -> str:
        a, b = pool[target][:2]
        train_copy = next(t for t, y in zip(labelled.meta["texts"]["train"], labelled.train.labels.tolist()) if CLASSES[y] == target)
        return "\n".join([
            f"Here are {count} new texts:", f"1. {a}", f'2. "{b}"', f"3. {a.upper()}", f"- {train_copy}",
            f"* {val_texts[0]}", "a " + "very " * 120 + "long text", "ok",
        ])

    experiment, spec = load(words, tmp_path, rounds=1, per_round=4, classes_per_round=2, temperature=0.5)
    teacher = ScriptedTeacher(messy)
    out = tmp_path / "out"
    result = run_pgkd(experiment, spec=spec, output_dir=out, client=teacher).result
    targets = result["rounds"][0]["generation"]["targets"]
    rows = read_jsonl(out / "round-0" / "generated.jsonl")
    assert [(row["text"], row["label"]) for row in rows] == [(pool[t][i], t) for t in targets for i in range(2)]
    prompt = teacher.requests()[0]["messages"][-1]["content"]
    for row in rows:
        assert row["round"] == 0 and row["target"] == row["label"] and row["teacher"] == "scripted-llm"
        assert row["sampling"]["temperature"] == 0.5 and row["sampling"]["n"] == 1
        assert "missed" in row["hard_negatives"] and "intruders" in row["hard_negatives"]
    assert all(f'"{item["text"]}" (classified as {item["predicted"]})' in prompt for item in rows[0]["hard_negatives"]["missed"])
    reasons = sorted(r["reason"] for r in read_jsonl(out / "round-0" / "rejected.jsonl"))
    assert reasons == sorted(["duplicate", "duplicate", "copies_heldout", "too_long", "too_short"] * 2)
    assert result["rounds"][0]["generation"]["kept"] == 4 and result["rounds"][0]["generation"]["candidates"] == 14
    assert read_jsonl(out / "generated.jsonl") == rows
    # round 1 trains on the labelled rows and the 4 kept examples, with their intended labels
    assert [r["train_size"] for r in result["rounds"]] == [24, 28] and result["rounds"][1]["generation"] is None
    assert result["stopped"] == "budget"
    run_config = load_experiment(out / "round-1" / "run" / "config.yaml")
    assert run_config.data.params["extra_train"] == [str((out / "round-0" / "generated.jsonl").resolve())]
    data = load_data(run_config.data)
    assert len(data.train) == 28 and data.train.labels[24:].tolist() == [CLASSES.index(row["label"]) for row in rows]
    assert data.meta["texts"]["train"][24:] == [row["text"] for row in rows]
    table = (out / "pgkd.md").read_text()
    assert re.search(rf"\| 0(?: \(best\))? \| 24 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 14 \| 4 \| {', '.join(targets)} \|", table)
    assert re.search(r"\| 1(?: \(best\))? \| 28 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \| - \| - \|", table)
    # a rerun reads everything back: no training, no teacher request
    import distill.engine.runner

    monkeypatch.setattr(distill.engine.runner, "run_experiment", lambda *a, **k: pytest.fail("a finished round was trained again"))
    again = run_pgkd(experiment, spec=spec, output_dir=out, client=ScriptedTeacher(lambda *a: pytest.fail("asked again"))).result
    assert again["rounds"] == result["rounds"]


def test_training_stops_after_patience_rounds_without_improvement(words: str, tmp_path: Path) -> None:
    experiment, spec = load(words, tmp_path, rounds=6, patience=2, metric="accuracy")
    teacher = ScriptedTeacher(lambda target, count: "Sure! Here they are:\n\n")  # nothing usable: the data never change
    out = tmp_path / "out"
    result = run_pgkd(experiment, spec=spec, output_dir=out, client=teacher).result
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and result["stopped"] == "patience"
    assert [r["improved"] for r in rounds] == [True, False, False] and [r["stale"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["val"] == rounds[0]["val"] == rounds[2]["val"]  # same data, same seed: the same student
    assert len(teacher.calls) == 2 and rounds[2]["generation"] is None and not (out / "round-2" / "generation.json").exists()
    assert all(r["generation"]["kept"] == 0 and r["generation"]["dropped"] == {"unparsed": 4} for r in rounds[:2])
    assert result["best_round"] == 0 and result["best"]["test"] == rounds[0]["test"]
    assert "2 round(s) passed without a validation accuracy gain above 0.0" in (out / "pgkd.md").read_text()
    # more patience continues the same folder: round 2 now generates and round 3 trains; rounds 0-2 are not retrained
    spec = spec.model_copy(update={"patience": 3})
    result = run_pgkd(experiment, spec=spec, output_dir=out, client=teacher).result
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2, 3] and result["stopped"] == "patience" and len(teacher.calls) == 3


def test_relabel_keeps_only_the_examples_the_teacher_classifies_as_intended(
    words: str, pool: dict[str, list[str]], tmp_path: Path
) -> None:
    truth = {text: name for name, texts in pool.items() for text in texts}
    unsure = {name: texts[2] for name, texts in pool.items()}

    def write(target: str, count: int) -> str:
        return "\n".join(pool[target][:3])

    def classify(text: str) -> str:
        if text in unsure.values():
            return "I am not sure."
        right = truth[text]
        return f"Category: {right}" if text == pool[right][0] else CLASSES[(CLASSES.index(right) + 1) % 4]

    experiment, spec = load(words, tmp_path, rounds=1, per_round=6, classes_per_round=2, relabel=True)
    teacher = ScriptedTeacher(write, classify)
    out = tmp_path / "out"
    result = run_pgkd(experiment, spec=spec, output_dir=out, client=teacher).result
    targets = result["rounds"][0]["generation"]["targets"]
    rows = read_jsonl(out / "round-0" / "generated.jsonl")
    assert [(row["text"], row["label"]) for row in rows] == [(pool[t][0], t) for t in targets]
    assert all(row["relabel"]["label"] == row["label"] for row in rows)
    asked = teacher.requests("classify")
    assert len(asked) == 6 and all(r["temperature"] == 0.0 for r in asked)
    assert {re.search(r"^Text: (.*)$", r["messages"][-1]["content"], re.MULTILINE).group(1) for r in asked} == {
        pool[t][i] for t in targets for i in range(3)
    }
    rejected = read_jsonl(out / "round-0" / "rejected.jsonl")
    assert sorted((r["text"], r["reason"]) for r in rejected) == sorted(
        [(pool[t][1], "teacher_disagrees") for t in targets] + [(pool[t][2], "unparsed_label") for t in targets]
    )
    assert result["rounds"][0]["generation"]["kept"] == 2 and result["rounds"][1]["train_size"] == 24 + 2


def test_the_command_runs_the_pgkd_section(words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    experiment_file = tmp_path / "pgkd.yaml"
    experiment_file.write_text(yaml.safe_dump(experiment_dict(words, tmp_path, rounds=0), sort_keys=False))
    parser = argparse.ArgumentParser(prog="distill")
    add_pgkd_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pgkd", str(experiment_file), "--set", "training.epochs=2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert command_pgkd(args, Console(stderr=True)) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| 0 \(best\) \| 24 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \| - \| - \|", printed)
    assert json.loads((tmp_path / "o" / "pgkd.json").read_text())["stopped"] == "budget"


def test_a_served_teacher_answers_through_the_real_client_and_server(words: str, tmp_path: Path) -> None:
    import socket
    from urllib.parse import urlsplit

    from tests.lm_fixtures import build_lm_folder, build_tokenizer

    # a random 1-layer Llama whose context holds the prompt (about 2,000 tokens of its byte-level vocabulary)
    build_tokenizer(tmp_path / "bpe")
    folder = build_lm_folder(tmp_path / "teacher", tmp_path / "bpe", layers=1, hidden=32, max_position_embeddings=4096)
    teacher = {"serve": {"model": str(folder)}, "max_concurrency": 2}
    experiment, spec = load(words, tmp_path, rounds=1, per_round=4, classes_per_round=2, max_tokens=24, hard_negatives=2,
                            examples_per_class=1, teacher=teacher)
    out = tmp_path / "out"
    result = run_pgkd(experiment, spec=spec, output_dir=out).result
    generation = result["rounds"][0]["generation"]
    assert generation["requests"] == 2 and len(result["rounds"]) == 2
    assert generation["candidates"] == generation["kept"] + sum(n for r, n in generation["dropped"].items() if r != "unparsed")
    assert re.fullmatch(r"teacher, served at http://127\.0\.0\.1:\d+/v1", result["teacher"])
    assert len(list((out / "teacher-cache").rglob("*.json"))) == 2  # the client's response cache, one file per request
    assert all(row["teacher"] == "teacher" for row in read_jsonl(out / "generated.jsonl"))
    address = urlsplit(result["teacher"].split(" at ")[1])
    with pytest.raises(OSError), socket.create_connection((address.hostname, address.port), timeout=2):
        pass  # the server is stopped when the loop ends


@pytest.mark.slow
def test_the_example_runs_a_round_with_the_served_teacher(tmp_path: Path) -> None:
    """The real thing: SmolLM2-135M-Instruct served locally writes the examples (minutes on a CPU)."""
    experiment, spec = load_pgkd_experiment(
        ROOT / "examples" / "pgkd_wordnet.yaml", [f"output_dir={tmp_path}", "pgkd.rounds=1", "training.epochs=3"]
    )
    result = run_pgkd(experiment, spec=spec).result
    assert len(result["rounds"]) == 2 and result["rounds"][0]["generation"]["requests"] == spec.classes_per_round
    assert result["rounds"][1]["train_size"] == result["rounds"][0]["train_size"] + result["rounds"][0]["generation"]["kept"]
