"""`distill serve` with the real SmolLM2-135M-Instruct teacher, asked over HTTP by the black-box
client (slow: the model loads in seconds, but every decode step runs 30 layers on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

SHOTS = [
    {"role": "system", "content": "Solve the word problem. Write the calculation, then the result on a last line as 'Answer: <number>'."},
    {"role": "user", "content": "Ana has 3 apples and buys 4 more. How many apples does she have now?"},
    {"role": "assistant", "content": "3 + 4 = 7.\nAnswer: 7"},
]


@pytest.fixture(scope="module")
def served():
    pytest.importorskip("gguf")
    from distill.blackbox import TeacherClient
    from distill.serve import TeacherServer, load_served_model

    model, tokenizer, name = load_served_model("smollm2-135m-instruct")
    with TeacherServer(model, tokenizer, name=name, max_batch_size=8) as server:
        client = TeacherClient.from_url(server.url, model=name, max_concurrency=8, timeout_s=600)
        yield model, tokenizer, server, client


def _messages(question: str) -> list[dict[str, str]]:
    return [*SHOTS, {"role": "user", "content": question}]


def test_greedy_chat_equals_generate_and_logprobs_equal_a_forward_pass(served) -> None:
    from distill.blackbox import choice_logprobs, choice_texts

    model, tokenizer, server, client = served
    messages = _messages("Kim has 5 marbles and finds 2 more. How many marbles does Kim have now?")
    response = client.chat(messages, max_tokens=12, temperature=0.0, logprobs=True, top_logprobs=5, cache=False)
    text = choice_texts(response)[0]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        reference = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = prompt["input_ids"].shape[1]
    generated = reference[0, start:].tolist()
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    ids = generated[: next((i for i, token in enumerate(generated) if token in stops), len(generated))]
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    # the chosen tokens' logprobs are the model's own (temperature 1), within float32 noise
    entries = choice_logprobs(response)[0]
    sequence = torch.cat([prompt["input_ids"][0], torch.tensor(ids, dtype=torch.long)])[None]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
    direct = [float(logprobs[start - 1 + i, token]) for i, token in enumerate(ids)]
    assert len(entries) == len(ids)
    for entry, value in zip(entries, direct):
        assert entry["logprob"] == pytest.approx(value, abs=2e-3)
        tops = list(entry["top_logprobs"].values())
        assert tops == sorted(tops, reverse=True) and entry["logprob"] <= tops[0] + 1e-6


def test_concurrent_requests_are_batched_and_match_serial_ones(served) -> None:
    from distill.blackbox import TeacherClient, choice_texts

    _, _, server, client = served
    questions = [f"Kim has {a} marbles and finds {b} more. How many marbles does Kim have now?" for a, b in ((2, 3), (6, 1), (4, 4), (7, 2))]
    requests = [dict(messages=_messages(q), max_tokens=10, temperature=0.0, cache=False) for q in questions]
    before = server.stats()["batches"]
    batched = [choice_texts(r)[0] for r in client.map("chat", requests)]
    assert server.stats()["batches"] - before < len(requests)
    serial_client = TeacherClient.from_url(server.url, model=server.name, max_concurrency=1, timeout_s=600)
    serial = [choice_texts(serial_client.chat(**r))[0] for r in requests]
    assert batched == serial
    sampled = client.chat(requests[0]["messages"], n=3, max_tokens=10, temperature=0.7, seed=5, cache=False)
    assert len(choice_texts(sampled)) == 3


def test_the_pipeline_generates_from_the_served_teacher(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from distill.synth import load_generate_spec, run_pipeline

    root = Path(__file__).resolve().parents[1]
    spec = load_generate_spec(root / "examples" / "teacher_data" / "generate.yaml", {
        "limit": 4, "chunk_prompts": 2, "output": str(tmp_path / "r.jsonl"), "rejected_output": str(tmp_path / "rej.jsonl"),
        "pairs.output": str(tmp_path / "p.jsonl"), "teacher.cache_dir": str(tmp_path / "responses"),
        "source.task.holdout.output": str(tmp_path / "test.jsonl"),
    })
    result = run_pipeline(spec)
    assert result.stats["samples"] == 12 and result.stats["prompts"]["done"] == 4
    kept = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(kept) == result.stats["kept"] and all('"correct": true' in line for line in kept)
    again = run_pipeline(spec, overwrite=True)  # every answer now comes from the response cache
    assert (tmp_path / "r.jsonl").read_text().splitlines() == kept and again.stats["kept"] == result.stats["kept"]
