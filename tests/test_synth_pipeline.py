"""distill generate end to end with a deterministic fake teacher: records, yield, pairs, documents, resume."""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.synth import pipeline as pipeline_module
from distill.answers import extract_answer
from distill.synth.filters import derive_seed, majority_vote
from distill.synth.pipeline import add_generate_parser, command_generate, run_pipeline
from distill.synth.sources import arithmetic_problems, write_arithmetic_chat_jsonl
from distill.synth.spec import GenerateSpecError, load_generate_spec

ROOT = Path(__file__).resolve().parents[1]
JUDGE_MARK = "Reply with Yes or No."


class FakeTeacher:
    """A seeded stand-in for an OpenAI-compatible teacher.

    Arithmetic: each sample is right with probability ``p_correct`` (the draw is keyed on the
    question, the request seed and the sample index), otherwise off by one or two; one in ten
    samples forgets the ``Answer:`` line, and rationales come in two wordings, so exact and near
    duplicates occur. Documents: two question-answer pairs taken from the chunk's sentences, one
    made-up pair, and a malformed line. Judge requests: P(yes) = 0.9 when the judged answer is
    right, 0.2 otherwise, as first-token top logprobs. Raises after ``fail_after`` prompts.
    """

    def __init__(self, p_correct: float = 0.6, fail_after: int | None = None) -> None:
        self.p_correct, self.fail_after = p_correct, fail_after
        self.problems = {p["question"]: p for p in arithmetic_problems(200, seed=0)}
        self.generated = 0
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def map(self, method: str, requests: list[dict[str, Any]], *, progress: Any = None) -> list[dict[str, Any]]:
        responses = []
        for request in requests:
            self.requests.append((method, request))
            text = request["messages"][-1]["content"] if method == "chat" else request["prompt"]
            if JUDGE_MARK in text:
                responses.append(self.judge(text, request))
                continue
            if self.fail_after is not None and self.generated >= self.fail_after:
                raise ConnectionError("the teacher went away")
            self.generated += 1
            texts = [self.document_reply(text) if "Text:\n" in text else self.arithmetic_reply(text, request, j)
                     for j in range(request["n"])]
            key = "message" if method == "chat" else "text"
            choices = [{"index": j, key: {"role": "assistant", "content": t} if key == "message" else t}
                       for j, t in enumerate(texts)]
            responses.append({"model": "fake-teacher", "choices": list(reversed(choices))})
        return responses

    def problem(self, text: str) -> dict[str, Any]:
        return next(p for q, p in self.problems.items() if q in text)

    def arithmetic_reply(self, text: str, request: dict[str, Any], sample: int) -> str:
        problem = self.problem(text)
        rng = random.Random(f"{problem['question']}|{request.get('seed')}|{sample}")
        a, b = problem["operands"]
        value = int(problem["reference"])
        if rng.random() >= self.p_correct:
            value += rng.choice([-2, -1, 1, 2])
        symbol = {"+": "+", "-": "-", "*": "×"}[problem["operation"]]
        if rng.random() < 0.1:
            return f"I think it is {value}."
        if rng.random() < 0.5:
            return f"{a} {symbol} {b} = {value}.\nAnswer: {value}"
        return f"We compute {a} {symbol} {b}, which gives {value}.\nAnswer: {value}"

    @staticmethod
    def document_reply(text: str) -> str:
        chunk = text.split("Text:\n", 1)[1].split("\n\nWrite each pair", 1)[0]
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", chunk) if s.strip()]
        lines = ["Sure, here are the pairs:"]
        for sentence in sentences[:2]:
            lines += [f"Q: What does the text say about {' '.join(sentence.split()[:3]).lower()}?", f"A: {sentence}"]
        lines += ["Q: What colour are bananas at night?", "A: Bananas turn purple under moonlight in Peru.",
                  "A: an answer without a question"]
        return "\n".join(lines)

    def judge(self, text: str, request: dict[str, Any]) -> dict[str, Any]:
        problem = self.problem(text)
        answer = extract_answer(text.split("Proposed answer:", 1)[1])
        p_yes = 0.9 if answer == problem["reference"] else 0.2
        tops = [{"token": "Yes", "logprob": math.log(p_yes)}, {"token": "No", "logprob": math.log(1 - p_yes - 0.05)},
                {"token": "Maybe", "logprob": math.log(0.05)}]
        first = max(tops, key=lambda t: t["logprob"])
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": first["token"]},
                             "logprobs": {"content": [{**first, "top_logprobs": tops}]}}]}


def arithmetic_spec(folder: Path, **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "arith",
        "output": str(folder / "out.jsonl"),
        "teacher": {"base_url": "http://127.0.0.1:8000/v1", "model": "fake-teacher"},
        "source": {"task": {"name": "arithmetic", "count": 20, "seed": 0}},
        "prompt": {"template": "{question}\nEnd with 'Answer: <number>'.", "system": "You are a careful tutor."},
        "generation": {"n": 4, "temperature": 0.9, "max_tokens": 64, "seed": 7},
        "filters": [
            {"type": "length", "min": 5},
            {"type": "self_consistency", "min_agreement": 0.5},
            "correct",
            "exact_dedup",
            {"type": "near_dedup", "threshold": 0.9},
            {"type": "critic", "threshold": 0.5},
        ],
        "pairs": {"output": str(folder / "pairs.jsonl"), "max_per_prompt": 2},
        "rejected_output": str(folder / "rejected.jsonl"),
        "chunk_prompts": 3,
    }
    spec.update(changes)
    return spec


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


FILES = ("out.jsonl", "pairs.jsonl", "rejected.jsonl", "out.jsonl.progress.jsonl")


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES if (folder / name).exists()}


def test_end_to_end_records_yield_and_pairs(tmp_path: Path) -> None:
    teacher = FakeTeacher()
    spec = load_generate_spec(arithmetic_spec(tmp_path))
    result = run_pipeline(spec, client=teacher)
    kept, rejected = lines(tmp_path / "out.jsonl"), lines(tmp_path / "rejected.jsonl")
    problems = {p["id"]: p for p in arithmetic_problems(20, seed=0)}
    assert kept and rejected
    labels = ["length", "self_consistency", "correct", "exact_dedup", "near_dedup", "critic"]
    for record in kept:
        assert list(record) == ["id", "prompt_id", "system", "prompt", "completion", "answer", "reference", "correct",
                                "teacher", "sampling", "scores", "source"]
        problem = problems[record["prompt_id"]]
        assert record["prompt"] == f"{problem['question']}\nEnd with 'Answer: <number>'."
        assert record["system"] == "You are a careful tutor."
        assert record["answer"] == record["reference"] == problem["reference"] and record["correct"] is True
        assert record["teacher"] == {"model": "fake-teacher", "base_url": "http://127.0.0.1:8000/v1"}
        assert record["sampling"] == {"n": 4, "temperature": 0.9, "top_p": 1.0, "max_tokens": 64,
                                      "seed": derive_seed(7, record["prompt_id"])}
        assert list(record["scores"]) == labels
        assert record["scores"]["critic"] == pytest.approx(0.9 / (0.9 + 0.05), abs=1e-6)
        assert record["source"]["task"] == "arithmetic" and record["id"] == f"{record['prompt_id']}/{record['source']['sample']}"
    # every sample is either kept or rejected; the vote is over all of a prompt's samples
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for record in kept + rejected:
        by_prompt.setdefault(record["prompt_id"], []).append(record)
    assert sorted(by_prompt) == sorted(problems) and all(len(v) == 4 for v in by_prompt.values())
    for prompt_id, records in by_prompt.items():
        majority, share = majority_vote([r["answer"] for r in records])
        for record in records:
            if record in kept:
                assert record["answer"] == majority and share >= 0.5
                assert record["scores"]["self_consistency"] == share
    assert {r["rejected_by"] for r in rejected} <= set(labels)
    # the yield: each filter's output is the next one's input; the last one's is what was kept
    stats = result.stats
    rows = stats["filters"]
    assert [r["name"] for r in rows] == labels
    assert rows[0]["in"] == stats["samples"] == 80 == len(kept) + len(rejected)
    assert all(a["out"] == b["in"] for a, b in zip(rows, rows[1:])) and rows[-1]["out"] == stats["kept"] == len(kept)
    for row in rows:
        assert row["in"] - row["out"] == sum(r["rejected_by"] == row["name"] for r in rejected) == row["dropped"]
    assert json.loads((tmp_path / "out.jsonl.stats.json").read_text()) == stats
    assert stats["prompts"] == {"total": 20, "done": 20, "in_output": 20} and result.generated_prompts == 20
    # pairs: a kept right answer against a wrong answer of the same prompt
    pairs = lines(tmp_path / "pairs.jsonl")
    assert pairs and stats["pairs"] == len(pairs)
    kept_ids = {r["id"] for r in kept}
    everything = {r["id"]: r for r in kept + rejected}
    for pair in pairs:
        assert pair["chosen_id"] in kept_ids and pair["chosen"] == everything[pair["chosen_id"]]["completion"]
        wrong = everything[pair["rejected_id"]]
        assert wrong["prompt_id"] == pair["prompt_id"] and wrong["answer"] not in (None, pair["reference"])
        assert pair["prompt"] == everything[pair["chosen_id"]]["prompt"]
    assert max(sum(p["prompt_id"] == q for p in pairs) for q in problems) <= 2
    # judge requests: one per sample that reached the critic, greedy, with its own seed
    judged = [r for m, r in teacher.requests if JUDGE_MARK in r["messages"][-1]["content"]]
    assert len(judged) == rows[-1]["in"] and all(r["temperature"] == 0.0 and r["max_tokens"] == 1 for r in judged)


def test_outputs_load_with_the_repository_data_sets(tmp_path: Path, tiny_lm: dict[str, Path]) -> None:
    from distill.data.preference import preference_jsonl
    from distill.data.text import chat_jsonl, get_tokenizer

    run_pipeline(load_generate_spec(arithmetic_spec(tmp_path)), client=FakeTeacher())
    tokenizer = str(tiny_lm["tokenizer"])
    kept = lines(tmp_path / "out.jsonl")
    data = chat_jsonl(files=str(tmp_path / "out.jsonl"), tokenizer=tokenizer, max_length=512)
    assert data.train.inputs.shape[0] == len(kept)
    tok, _ = get_tokenizer(tokenizer)
    targets = [int(t) for t in data.train.labels[0] if int(t) != -100]
    assert tok.decode(targets).startswith(kept[0]["completion"])
    pairs = preference_jsonl(files=str(tmp_path / "pairs.jsonl"), tokenizer=tokenizer, max_length=512)
    assert pairs.train.inputs.shape[:2] == (len(lines(tmp_path / "pairs.jsonl")), 2)
    gold = tmp_path / "gold.jsonl"
    train = write_arithmetic_chat_jsonl(gold, 12, seed=1, template="{question}\nEnd with 'Answer: <number>'.")
    held_out = write_arithmetic_chat_jsonl(tmp_path / "test.jsonl", 6, seed=1, exclude=[p["question"] for p in train])
    assert not {p["question"] for p in train} & {p["question"] for p in held_out}
    both = chat_jsonl(files=str(gold), test_files=str(tmp_path / "test.jsonl"), tokenizer=tokenizer, max_length=512)
    assert both.train.inputs.shape[0] == 12 and both.test.inputs.shape[0] == 6
    first = [int(t) for t in both.train.labels[0] if int(t) != -100]
    assert tok.decode(first).startswith(train[0]["rationale"])


def repeated_prompts_spec(folder: Path) -> dict[str, Any]:
    """Seed prompts that repeat questions under other ids: exact duplicates across chunks, so the
    dedup state rebuilt on resume decides what is kept."""
    seeds = folder.parent / "seeds.jsonl"  # shared: the records name their source file
    problems = arithmetic_problems(5, seed=0)
    seeds.write_text("".join(
        json.dumps({"key": f"q{i}", "text": p["question"], "gold": int(p["reference"])}) + "\n"
        for i, p in enumerate(problems * 4)
    ))
    return arithmetic_spec(
        folder,
        source={"prompts": {"files": str(seeds), "field": "text", "reference_field": "gold", "id_field": "key"}},
        filters=[{"type": "exact_dedup", "field": "completion"}, {"type": "near_dedup", "field": "completion",
                                                                  "threshold": 0.6, "method": "exact"}],
        pairs=None,
    )


@pytest.mark.parametrize("make_spec", [arithmetic_spec, repeated_prompts_spec])
def test_a_killed_run_resumes_byte_identically(tmp_path: Path, make_spec: Any) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_pipeline(load_generate_spec(make_spec(whole)), client=FakeTeacher())
    spec = load_generate_spec(make_spec(broken))
    if make_spec is repeated_prompts_spec:  # duplicates of records kept in earlier chunks were dropped
        first_chunk = {r["completion"] for r in lines(whole / "out.jsonl") if r["prompt_id"] in ("q0", "q1", "q2")}
        late = [r for r in lines(whole / "rejected.jsonl") if r["prompt_id"] not in ("q0", "q1", "q2")]
        assert any(r["rejected_by"] == "exact_dedup" and r["completion"] in first_chunk for r in late)
    with pytest.raises(ConnectionError):
        run_pipeline(spec, client=FakeTeacher(fail_after=7))  # dies inside the third chunk
    journal = lines(broken / "out.jsonl.progress.jsonl")
    assert len(journal) == 6
    result = run_pipeline(spec, client=FakeTeacher())
    assert result.generated_prompts == 14 and result.skipped_prompts == 6
    assert "6 prompts already done" in result.log[0]
    assert file_bytes(broken) == file_bytes(whole)
    assert {k: v for k, v in result.stats.items() if "time" not in k and "per_s" not in k and "output" not in k
            and "prompts" not in k} == {k: v for k, v in json.loads((whole / "out.jsonl.stats.json").read_text()).items()
                                        if "time" not in k and "per_s" not in k and "output" not in k and "prompts" not in k}
    again = run_pipeline(spec, client=FakeTeacher(fail_after=0))  # nothing left: the teacher is not asked
    assert again.generated_prompts == 0 and file_bytes(broken) == file_bytes(whole)


def test_unjournaled_records_and_torn_lines_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_pipeline(load_generate_spec(arithmetic_spec(whole)), client=FakeTeacher())
    spec = load_generate_spec(arithmetic_spec(broken))
    real = pipeline_module._append_lines
    journal_writes = []

    def crash_before_third_journal(path: Path, text: list[str]) -> None:
        if path.name.endswith(".progress.jsonl"):
            journal_writes.append(path)
            if len(journal_writes) == 3:
                raise KeyboardInterrupt  # records of chunk 3 are written, its journal lines are not
        real(path, text)

    monkeypatch.setattr(pipeline_module, "_append_lines", crash_before_third_journal)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, client=FakeTeacher())
    monkeypatch.setattr(pipeline_module, "_append_lines", real)
    assert {r["prompt_id"] for r in lines(broken / "out.jsonl")} - {e["prompt_id"] for e in lines(broken / "out.jsonl.progress.jsonl")}
    with open(broken / "out.jsonl", "ab") as handle:
        handle.write(b'{"id": "arithmetic-0-99/0", "prompt_id": "arith')  # a torn last line
    journal = (broken / "out.jsonl.progress.jsonl").read_bytes()
    (broken / "out.jsonl.progress.jsonl").write_bytes(journal[:-20])  # the last prompt's line torn too
    result = run_pipeline(spec, client=FakeTeacher())
    assert result.generated_prompts == 17  # the second chunk lost a prompt's journal line: redone whole
    assert "dropped" in result.log[0]
    assert file_bytes(broken) == file_bytes(whole)


def test_changed_spec_is_refused_naming_the_key(tmp_path: Path) -> None:
    first = arithmetic_spec(tmp_path)
    run_pipeline(load_generate_spec({**first, "limit": 4}), client=FakeTeacher())
    changed = {**first, "generation": {**first["generation"], "temperature": 0.5}}
    with pytest.raises(GenerateSpecError, match=r"generation.temperature: 0.9 in the existing output, 0.5 now"):
        run_pipeline(load_generate_spec(changed), client=FakeTeacher())
    other_task = {**first, "source": {"task": {"name": "arithmetic", "count": 20, "seed": 1}}}
    with pytest.raises(GenerateSpecError, match="source.task.seed: 0 in the existing output, 1 now"):
        run_pipeline(load_generate_spec(other_task), client=FakeTeacher())
    # name, limit and connection settings do not matter: raising the limit continues the run
    continued = {**first, "name": "renamed", "teacher": {**first["teacher"], "max_concurrency": 2, "timeout_s": 5}}
    result = run_pipeline(load_generate_spec(continued), client=FakeTeacher())
    assert result.generated_prompts == 17  # prompt 4 shared a chunk with prompts 5 and 6: redone with them
    whole = tmp_path / "whole"
    run_pipeline(load_generate_spec(arithmetic_spec(whole)), client=FakeTeacher())
    assert file_bytes(tmp_path) == file_bytes(whole)
    fewer = run_pipeline(load_generate_spec({**first, "limit": 4}), client=FakeTeacher(fail_after=0))
    assert fewer.stats["prompts"] == {"total": 4, "done": 4, "in_output": 20} and file_bytes(tmp_path) == file_bytes(whole)
    restarted = run_pipeline(load_generate_spec(changed), client=FakeTeacher(), overwrite=True)
    assert restarted.generated_prompts == 20 and file_bytes(tmp_path) != file_bytes(whole)
    (tmp_path / "out.jsonl.meta.json").unlink()
    with pytest.raises(GenerateSpecError, match="without out.jsonl.meta.json"):
        run_pipeline(load_generate_spec(changed), client=FakeTeacher())


DOC_A = """Spider silk is a protein fibre spun by spiders. Its strength comes from beta-sheet nanocrystals.

Dragline silk is tougher than steel by weight. It combines tensile strength with extensibility.

Molecular dynamics simulations show that small crystals fail gracefully. Large crystals crack suddenly."""

DOC_B = """Bone is a hierarchical composite of collagen and mineral. Its toughness comes from many length scales.

Nacre owes its toughness to brick-and-mortar layers. Cracks deflect along the organic interfaces."""


def test_documents_become_grounded_question_answer_pairs(tmp_path: Path, tiny_lm: dict[str, Path]) -> None:
    from distill.data.text import chat_jsonl

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(DOC_A, encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text(DOC_B, encoding="utf-8")
    spec = load_generate_spec({
        "name": "qa",
        "output": str(tmp_path / "qa.jsonl"),
        "teacher": {"base_url": "http://127.0.0.1:8000/v1"},
        "source": {"documents": {"files": str(tmp_path / "docs" / "*.txt"), "chunk_chars": 200, "overlap_chars": 0,
                                 "questions_per_chunk": 3}},
        "generation": {"n": 2, "chat": False},
        "filters": [{"type": "grounded", "threshold": 0.6}, "exact_dedup"],
        "rejected_output": str(tmp_path / "rejected.jsonl"),
    })
    teacher = FakeTeacher()
    result = run_pipeline(spec, client=teacher)
    assert all(method == "complete" and "{" not in r["prompt"] for method, r in teacher.requests)
    kept, rejected = lines(tmp_path / "qa.jsonl"), lines(tmp_path / "rejected.jsonl")
    texts = {str(tmp_path / "docs" / "a.txt"): DOC_A, str(tmp_path / "docs" / "b.txt"): DOC_B}
    chunks = {(r["source"]["file"], r["source"]["chunk"]) for r in kept}
    assert {file for file, _ in chunks} == set(texts) and len(chunks) == len(teacher.requests)
    for record in kept:
        source = record["source"]
        chunk = texts[source["file"]][source["start"] : source["end"]]
        assert record["completion"] in chunk  # the answer is a sentence of its own chunk
        assert record["prompt"].startswith("What does the text say about")
        assert record["prompt_id"] == f"{source['file']}#{source['chunk']}" and source["sample"] == 0
        assert record["scores"]["grounded"] >= 0.6 and record["correct"] is None
    # two pairs per chunk survive; the made-up pair fails grounding, the second sample's copies are duplicates
    assert len(kept) == 2 * len(chunks)
    assert {r["rejected_by"] for r in rejected if "Bananas" in r["completion"]} == {"grounded"}
    assert sum(r["rejected_by"] == "exact_dedup" for r in rejected) == len(kept)
    assert result.stats["samples"] == 2 * 3 * len(chunks)  # 3 pairs per sample (the cap), malformed lines ignored
    data = chat_jsonl(files=str(tmp_path / "qa.jsonl"), tokenizer=str(tiny_lm["tokenizer"]), max_length=256)
    assert data.train.inputs.shape[0] == len(kept)


def test_command_line_prints_the_yield(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from rich.console import Console

    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(arithmetic_spec(tmp_path)))
    monkeypatch.setattr(pipeline_module, "make_client", lambda fields, log=None: FakeTeacher())
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", str(path), "--limit", "6", "--no-progress", "--set", "generation.n=3"])
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    assert command_generate(args, Console(file=io.StringIO())) == 0
    printed = buffer.getvalue()
    assert "Filter yield of arith (6 of 6 prompts)" in printed and "overall" in printed and "self_consistency" in printed
    assert json.loads((tmp_path / "out.jsonl.stats.json").read_text())["samples"] == 18
    (tmp_path / "out.jsonl.meta.json").unlink()
    monkeypatch.setattr(pipeline_module, "make_client", lambda fields, log=None: FakeTeacher(fail_after=4))
    errors = io.StringIO()
    again = parser.parse_args(["generate", str(path), "--no-progress", "--overwrite"])
    assert command_generate(again, Console(file=errors, width=200)) == 1
    assert "the teacher failed: the teacher went away" in errors.getvalue() and "rerun" in errors.getvalue()
    assert len(lines(tmp_path / "out.jsonl.progress.jsonl")) == 3  # the first chunk (3 prompts) is kept
    bad = parser.parse_args(["generate", str(path), "--set", "generation.temperatur=1"])
    with pytest.raises(GenerateSpecError, match="generation.temperatur: unknown key"):
        command_generate(bad, Console(file=io.StringIO()))


def test_serve_starts_a_local_server_and_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.serve

    events: list[Any] = []

    class Server:
        def __init__(self, model: Any, tokenizer: Any, *, name: str, host: str, port: int, max_batch_size: int) -> None:
            events.append(("init", model, tokenizer, name, host, port, max_batch_size))

        def start(self) -> str:
            events.append("start")
            return "http://127.0.0.1:40123/v1"

        def stop(self) -> None:
            events.append("stop")

    def load_served_model(model: str, *, stage: str | None = None, device: str = "cpu") -> tuple[Any, Any, str]:
        events.append(("load", model, stage, device))
        return "weights", "tokenizer", f"{model}:{stage}"

    monkeypatch.setattr(distill.serve, "TeacherServer", Server, raising=False)
    monkeypatch.setattr(distill.serve, "load_served_model", load_served_model, raising=False)
    made: list[tuple[str | None, str | None]] = []

    def make_client(fields: Any, log: Any = None) -> FakeTeacher:
        made.append((fields.base_url, fields.model))
        return FakeTeacher()

    monkeypatch.setattr(pipeline_module, "make_client", make_client)
    spec = arithmetic_spec(tmp_path, teacher={"serve": {"model": "runs/x", "stage": "student", "max_batch_size": 4}},
                           source={"task": {"name": "arithmetic", "count": 3}})
    run_pipeline(load_generate_spec(spec))
    assert events == [("load", "runs/x", "student", "cpu"),
                      ("init", "weights", "tokenizer", "runs/x:student", "127.0.0.1", 0, 4), "start", "stop"]
    assert made == [("http://127.0.0.1:40123/v1", "runs/x:student")]
    record = lines(tmp_path / "out.jsonl")[0]
    assert record["teacher"] == {"model": "runs/x:student", "base_url": None,
                                 "serve": {"model": "runs/x", "stage": "student"}}
    events.clear()
    faster = {**spec, "teacher": {"serve": {**spec["teacher"]["serve"], "max_batch_size": 32}}}
    assert run_pipeline(load_generate_spec(faster)).generated_prompts == 0 and not events  # nothing left to do


def test_a_served_local_model_through_the_real_client(tmp_path: Path, tiny_lm: dict[str, Path]) -> None:
    """teacher.serve starts distill serve on the tiny Llama and talks to it with the black-box client."""
    spec = load_generate_spec({
        "name": "served",
        "output": str(tmp_path / "out.jsonl"),
        "teacher": {"serve": {"model": str(tiny_lm["teacher"]), "max_batch_size": 4}},
        "source": {"task": {"name": "arithmetic", "count": 3}},
        "generation": {"n": 2, "max_tokens": 6, "seed": 0},
        "filters": [{"type": "length", "min": 0}, {"type": "critic", "threshold": 0.0}],
    })
    first = run_pipeline(spec)
    records = lines(tmp_path / "out.jsonl")
    assert first.stats["samples"] == 6 == len(records)
    assert all(r["teacher"]["model"] and r["teacher"]["base_url"] is None for r in records)
    assert all(0.0 <= r["scores"]["critic"] <= 1.0 for r in records)  # P(yes) read from real top_logprobs
    before = (tmp_path / "out.jsonl").read_bytes()
    run_pipeline(spec, overwrite=True)
    assert (tmp_path / "out.jsonl").read_bytes() == before  # per-prompt seeds: the same samples again


def test_the_example_spec_and_the_documentation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_generate_spec(ROOT / "examples" / "teacher_data" / "generate.yaml")
    assert spec.source.task is not None and spec.pairs is not None
    page = (ROOT / "docs" / "generate.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/generate.md", "exec"), {"__name__": "docs_generate"})


def test_shots_steer_the_teacher_but_stay_out_of_the_records(tmp_path: Path) -> None:
    from distill.synth.pipeline import build_request
    from distill.synth.sources import PromptItem

    shots = [{"user": "Ana has 3 pens and buys 4 more. How many?", "assistant": "3 + 4 = 7.\nAnswer: 7"}]
    spec = load_generate_spec(arithmetic_spec(tmp_path, prompt={"template": "{question}", "system": "Be brief.", "shots": shots}))
    item = PromptItem(id="p1", question="Kim has 2 cats and gets 5 more. How many?", reference="7")
    messages = build_request(spec, item)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == shots[0]["user"] and messages[2]["content"] == shots[0]["assistant"]
    assert messages[-1]["content"] == item.question
    plain = load_generate_spec(arithmetic_spec(
        tmp_path, prompt={"template": "{question}", "shots": shots}, generation={"n": 1, "chat": False}))
    assert build_request(plain, item)["prompt"] == f"{shots[0]['user']}\n{shots[0]['assistant']}\n\n{item.question}"
