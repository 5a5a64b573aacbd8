"""The black-box client against the real ``distill serve`` over HTTP on localhost (the tiny random Llama)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.blackbox import TeacherAPIError, TeacherClient, choice_logprobs, choice_texts, finish_reasons
from distill.serve.server import TeacherServer

PROMPTS = ["From fairest creatures", "A dog is a domesticated", "Thy self thy foe, to thy sweet self too cruel. But as"]
KEY = "sk-serve-client-4b7e91d2"

pytestmark = pytest.mark.usefixtures("no_proxy")


@pytest.fixture(scope="module")
def server(served_lm) -> Iterator[TeacherServer]:
    model, tokenizer, name = served_lm
    with TeacherServer(model, tokenizer, name=name, max_batch_size=16, batch_wait_ms=5) as running:
        yield running


def client_of(server: TeacherServer, **fields: Any) -> TeacherClient:
    """A client that names the model (no /models request) and never really sleeps before a retry."""
    fields.setdefault("model", server.name)
    return TeacherClient.from_url(server.url, sleep=lambda seconds: None, **fields)


def greedy(model: torch.nn.Module, tokenizer: Any, prompt: list[int], new_tokens: int) -> str:
    """The reference: Hugging Face's greedy generate, cut at the end-of-sequence token, decoded."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completions_chat_and_samples_through_the_client(server, served_lm) -> None:
    model, tokenizer, _ = served_lm
    client = client_of(server)
    response = client.complete(PROMPTS[1], max_tokens=6, temperature=0)
    assert choice_texts(response) == [greedy(model, tokenizer, tokenizer(PROMPTS[1]).input_ids, 6)]
    assert finish_reasons(response)[0] in ("stop", "length")
    # a token-id prompt is the same request as its text
    assert choice_texts(client.complete(tokenizer(PROMPTS[1]).input_ids, max_tokens=6, temperature=0)) == choice_texts(response)

    messages = [{"role": "user", "content": "Define dog."}]
    chat = client.chat(messages, max_tokens=5, temperature=0)
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert choice_texts(chat) == [greedy(model, tokenizer, tokenizer(template, add_special_tokens=False).input_ids, 5)]

    samples = client.complete(PROMPTS[0], n=3, max_tokens=8, temperature=1.0, seed=7)
    texts = choice_texts(samples)
    assert len(texts) == 3 and len(set(texts)) > 1  # three different samples of a random model
    assert choice_texts(client.complete(PROMPTS[0], n=3, max_tokens=8, temperature=1.0, seed=7)) == texts  # seeded
    assert client.stats.requests == 5 and client.stats.retries == 0


def test_logprobs_through_choice_logprobs_match_a_forward_pass(server, served_lm) -> None:
    model, tokenizer, _ = served_lm
    client = client_of(server)
    prompt = tokenizer(PROMPTS[2]).input_ids
    response = client.complete(prompt, max_tokens=3, temperature=0, logprobs=5, echo=True, return_tokens_as_token_ids=True)
    [tokens] = choice_logprobs(response)
    ids = [int(entry["token"].split(":")[1]) for entry in tokens]
    assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 3
    assert tokens[0]["logprob"] is None and not tokens[0]["top_logprobs"]  # nothing predicts the first token
    reference = forward_logprobs(model, ids)
    for position in range(1, len(ids)):  # entry i: the distribution after tokens 0..i-1
        expected = reference[position - 1]
        assert tokens[position]["logprob"] == pytest.approx(float(expected[ids[position]]), abs=1e-4)
        top = tokens[position]["top_logprobs"]
        best = expected.topk(5)
        assert len(top) in (5, 6)  # the top 5, plus the token itself when it is not among them
        for token, value in zip(best.indices.tolist(), best.values.tolist()):
            assert top[f"token_id:{token}"] == pytest.approx(value, abs=1e-4)

    messages = [{"role": "user", "content": "Define cat."}]
    chat = client.chat(messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, return_tokens_as_token_ids=True)
    [entries] = choice_logprobs(chat)
    template = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(template, add_special_tokens=False).input_ids
    assert 1 <= len(entries) <= 4
    for entry in entries:  # each generated token: its logprob and the 3 most likely after the text so far
        expected = forward_logprobs(model, ids)[-1]
        token = int(entry["token"].split(":")[1])
        assert entry["logprob"] == pytest.approx(float(expected[token]), abs=1e-4)
        best = expected.topk(3)
        assert entry["top_logprobs"] == pytest.approx(
            {f"token_id:{i}": v for i, v in zip(best.indices.tolist(), best.values.tolist())}, abs=1e-4
        )
        ids.append(token)


def test_a_concurrent_map_is_batched_on_the_server_and_equals_serial_requests(served_lm) -> None:
    model, tokenizer, name = served_lm
    requests = [{"prompt": f"{PROMPTS[i % 3]}{' the' * (i // 3)}", "max_tokens": 4, "temperature": 0} for i in range(16)]
    with TeacherServer(model, tokenizer, name=name, max_batch_size=16, batch_wait_ms=300) as batched:
        client = client_of(batched, max_concurrency=16)
        results = client.map("complete", requests)
        stats = batched.stats()
        assert stats["requests"]["completions"] == stats["sequences"] == 16
        assert stats["batches"] < 16 and stats["largest_batch"] > 1
    assert client.stats.requests == 16 and client.stats.cache_hits == 0
    with TeacherServer(model, tokenizer, name=name, max_batch_size=1, batch_wait_ms=0) as alone:
        serial = [client_of(alone).complete(**request) for request in requests]
        assert alone.stats()["batches"] == 16
    assert [choice_texts(r) for r in results] == [choice_texts(r) for r in serial]


def test_the_bearer_key_is_checked_and_never_shown(served_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, name = served_lm
    lines: list[str] = []
    with TeacherServer(model, tokenizer, name=name, api_key=KEY) as keyed:
        monkeypatch.setenv("TEACHER_KEY", KEY)
        assert choice_texts(client_of(keyed, api_key_env="TEACHER_KEY").complete("A dog", max_tokens=2))
        wrong = "sk-wrong-0000-1111"
        monkeypatch.setenv("TEACHER_KEY", wrong)
        client = client_of(keyed, api_key_env="TEACHER_KEY", log=lines.append)
        with pytest.raises(TeacherAPIError) as caught:
            client.complete("A dog", max_tokens=2)
        assert keyed.stats()["requests"]["errors_4xx"] == 1
    error = caught.value
    assert error.status == 401 and error.attempts == 1 and client.stats.retries == 0 and client.stats.requests == 1
    assert "$TEACHER_KEY" in str(error)  # names the variable to check
    shown = " ".join([str(error), repr(error), repr(client), *lines])
    assert KEY not in shown and wrong not in shown


def test_retries_ride_out_a_failing_server(server, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = choice_texts(client_of(server).complete(PROMPTS[0], max_tokens=4, temperature=0))
    failures = 3
    calls = {"count": 0}
    original = server.model.forward

    @functools.wraps(original)
    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        if calls["count"] <= failures:
            raise RuntimeError("simulated failure of the accelerator")
        return original(*args, **kwargs)

    monkeypatch.setattr(server.model, "forward", flaky)
    before = server.stats()
    lines: list[str] = []
    client = client_of(server, max_retries=5, log=lines.append)
    response = client.complete(PROMPTS[0], max_tokens=4, temperature=0)
    after = server.stats()
    assert choice_texts(response) == expected
    assert client.stats.retries == failures and client.stats.requests == failures + 1 and client.stats.failures == 0
    assert after["requests"]["errors_5xx"] - before["requests"]["errors_5xx"] == failures
    assert after["failed_batches"] - before["failed_batches"] == failures
    assert len(lines) == failures and all("HTTP 500" in line and "simulated failure" in line for line in lines)

    # more failures than retries: the last answer is raised
    calls["count"] = 0
    stubborn = client_of(server, max_retries=1)
    with pytest.raises(TeacherAPIError) as caught:
        stubborn.complete(PROMPTS[1], max_tokens=4, temperature=0)
    assert caught.value.status == 500 and caught.value.attempts == 2 and "simulated failure" in caught.value.message


def test_a_bad_request_is_a_4xx_with_the_servers_message_and_is_not_retried(server) -> None:
    client = client_of(server)
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("A dog", max_tokens=2, logprobs=21)
    assert caught.value.status == 400 and caught.value.attempts == 1
    assert "'logprobs' is 21, above this server's limit of 20" in caught.value.message
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("A dog", max_tokens=2, model="no-such-model")
    assert caught.value.status == 404 and "this server serves 'teacher'" in caught.value.message
    assert "check base_url" in caught.value.message  # the client's hint for a 404
    with pytest.raises(TeacherAPIError) as caught:
        client.map("complete", [{"prompt": "A dog", "max_tokens": 1}, {"prompt": "A cat", "max_tokens": 1, "suffix": "!"}])
    assert caught.value.status == 400 and caught.value.index == 1 and "'suffix' is not supported" in caught.value.message
    assert client.stats.retries == 0 and client.stats.failures == 3


def test_the_response_cache_answers_when_the_server_is_gone(served_lm, tmp_path: Path) -> None:
    model, tokenizer, name = served_lm
    requests = [{"prompt": text, "max_tokens": 5, "temperature": 0, "logprobs": 2} for text in PROMPTS]
    requests.append({"prompt": PROMPTS[0], "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3})
    with TeacherServer(model, tokenizer, name=name) as running:
        first = client_of(running, cache_dir=tmp_path / "responses")
        results = first.map("complete", requests)
        url = running.url
    assert first.stats.requests == len(requests) and first.stats.cache_hits == 0
    again = TeacherClient.from_url(url, model=name, cache_dir=tmp_path / "responses", max_retries=0)
    assert again.map("complete", requests) == results
    assert again.stats.requests == 0 and again.stats.cache_hits == len(requests)
    with pytest.raises(TeacherAPIError) as caught:  # the server is really gone: a new request finds no one
        again.complete("not asked before", max_tokens=1)
    assert caught.value.status is None
