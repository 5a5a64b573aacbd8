"""``distill serve``: real HTTP on localhost against the tiny random Llama of the ``tiny_lm`` fixture."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.config import ConfigError
from distill.serve.cli import api_key_from_env
from distill.serve.engine import Row, SamplingParams, choose_token, decode_batch
from distill.serve.loading import load_served_model
from distill.serve.server import TeacherServer, is_loopback

PROMPTS = ["From fairest creatures", "A dog is a domesticated", "Thy self thy foe, to thy sweet self too cruel. But as"]


def request(url: str, path: str, body: Any = None, *, key: str | None = None, method: str | None = None,
            raw: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one HTTP request; 4xx/5xx are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def ok(url: str, path: str, body: Any = None, **kwargs: Any) -> dict:
    status, payload, _ = request(url, path, body, **kwargs)
    assert status == 200, payload
    return payload


def ids_of(choice: dict) -> list[int]:
    """Generated token ids of a completion asked with return_tokens_as_token_ids."""
    return [int(token.split(":")[1]) for token in choice["logprobs"]["tokens"]]


@pytest.fixture(scope="module")
def server(served_lm):
    model, tokenizer, name = served_lm
    lines: list[str] = []
    with TeacherServer(model, tokenizer, name=name, log=lines.append, max_batch_size=8, batch_wait_ms=5) as running:
        running.lines = lines  # type: ignore[attr-defined]
        yield running


def forward_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full-sequence forward pass, float32 ``[T, V]``: the independent reference."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# -- decoding --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(served_lm):
    """A random 1-layer GPT-2 with the tiny tokenizer: learned absolute positions, unlike Llama's
    rotary ones (which hide a wrong position offset), so it checks the position ids of padded rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer, _ = served_lm
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_batched_greedy_equals_alone_and_hf_generate(served_lm, gpt2, architecture):
    llama, tokenizer, _ = served_lm
    model = llama if architecture == "llama" else gpt2
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding matters
    batch = [Row(p, SamplingParams(max_new_tokens=10, temperature=0)) for p in prompts]
    decode_batch(model, batch, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    for prompt, row in zip(prompts, batch):
        alone = Row(prompt, SamplingParams(max_new_tokens=10, temperature=0))
        decode_batch(model, [alone], eos_token_ids=[tokenizer.eos_token_id])
        with torch.no_grad():
            reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id)]
        assert row.tokens == alone.tokens == reference
        assert row.generated == 10 or row.finish_reason == "stop"


@pytest.mark.parametrize("shrink", [True, False])
def test_rows_finish_independently(served_lm, gpt2, shrink, monkeypatch):
    """Rows with different budgets and stop strings in one batch give what each gives alone, whether
    finished rows are dropped from the cache or carried along (caches without batch_select_indices)."""
    _, tokenizer, _ = served_lm
    if not shrink:
        monkeypatch.setattr("distill.serve.engine._can_shrink", lambda cache: False)
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    full = [Row(p, SamplingParams(max_new_tokens=10, temperature=0)) for p in prompts]
    decode_batch(gpt2, full, decode=tokenizer.decode)
    candidates = [c for c in full[2].text[1:] if c.isascii() and c.isalnum()]
    assert candidates, f"greedy text without an ASCII letter to stop at: {full[2].text!r}"
    stop = candidates[0]
    settings = [SamplingParams(max_new_tokens=3, temperature=0), SamplingParams(max_new_tokens=10, temperature=0),
                SamplingParams(max_new_tokens=10, temperature=0, stop=(stop,))]
    rows = [Row(p, params) for p, params in zip(prompts, settings)]
    decode_batch(gpt2, rows, decode=tokenizer.decode)
    assert rows[0].tokens == full[0].tokens[:3] and rows[0].finish_reason == "length"
    assert rows[1].tokens == full[1].tokens and rows[1].finish_reason == "length"
    assert rows[2].text == full[2].text[: full[2].text.find(stop)] and rows[2].finish_reason == "stop"
    assert rows[2].tokens == full[2].tokens[: len(rows[2].tokens)]


def test_choose_token_follows_temperature_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs.clamp_min(1e-12))
    generator = torch.Generator().manual_seed(0)

    def frequencies(params: SamplingParams, draws: int = 4000) -> torch.Tensor:
        counts = torch.zeros(5)
        for _ in range(draws):
            counts[choose_token(logits, params, generator)] += 1
        return counts / draws

    assert torch.allclose(frequencies(SamplingParams(temperature=1.0)), probs, atol=0.03)
    sharp = probs**2 / (probs**2).sum()  # temperature 0.5 squares the probabilities
    assert torch.allclose(frequencies(SamplingParams(temperature=0.5)), sharp, atol=0.03)
    nucleus = frequencies(SamplingParams(temperature=1.0, top_p=0.7))  # {0, 1}: 0.5 < 0.7 <= 0.8
    assert nucleus[2:].sum() == 0
    assert torch.allclose(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.03)
    assert choose_token(logits, SamplingParams(temperature=0), None) == 0
    assert frequencies(SamplingParams(temperature=1.0, top_p=1e-6), 200)[0] == 1.0


# -- endpoints -------------------------------------------------------------------------------------


def test_models_health_and_stats(server):
    listing = ok(server.url, "/models")
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [server.name] == ["teacher"]
    assert listing["data"][0]["max_model_len"] == 256
    assert ok(server.url, f"/models/{server.name}")["id"] == server.name
    status, error, _ = request(server.url, "/models/other")
    assert status == 404 and error["error"]["code"] == "model_not_found"
    base = server.url[: -len("/v1")]
    assert ok(base, "/health") == {"status": "ok"}
    stats = ok(base, "/stats")
    assert {"requests", "sequences", "generated_tokens", "batches", "mean_batch_size"} <= set(stats)


def test_completion_shape_and_usage(server, served_lm):
    _, tokenizer, _ = served_lm
    response = ok(server.url, "/completions", {"model": "teacher", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
    assert response["object"] == "text_completion" and response["model"] == "teacher"
    assert response["id"].startswith("cmpl-")
    (choice,) = response["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = response["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(PROMPTS[0]).input_ids)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == 4 or choice["finish_reason"] == "stop"


def test_chat_shape(server, served_lm):
    _, tokenizer, _ = served_lm
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define dog."}]
    response = ok(server.url, "/chat/completions", {"model": "teacher", "messages": messages, "max_completion_tokens": 3,
                                                  "temperature": 0})
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    (choice,) = response["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert response["usage"]["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False).input_ids)
    # the chat answer is the greedy continuation of the templated prompt
    completion = ok(server.url, "/completions", {"prompt": tokenizer(prompt, add_special_tokens=False).input_ids,
                                                  "max_tokens": 3, "temperature": 0})
    assert completion["choices"][0]["text"] == choice["message"]["content"]
    # content given as text parts is the same message
    parts = [{"role": "user", "content": [{"type": "text", "text": "Define "}, {"type": "text", "text": "dog."}]}]
    plain = [{"role": "user", "content": "Define dog."}]
    body = {"max_tokens": 3, "temperature": 0}
    assert ok(server.url, "/chat/completions", {**body, "messages": parts})["choices"][0]["message"] == \
        ok(server.url, "/chat/completions", {**body, "messages": plain})["choices"][0]["message"]


def test_n_samples_batch_prompts_and_seeds(server):
    body = {"prompt": PROMPTS[:2], "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    first = ok(server.url, "/completions", body)
    assert [c["index"] for c in first["choices"]] == list(range(6))
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts[:3])) > 1  # the samples of one prompt differ
    again = ok(server.url, "/completions", body)
    assert [c["text"] for c in again["choices"]] == texts  # seeded: reproducible
    other = ok(server.url, "/completions", {**body, "seed": 8})
    assert [c["text"] for c in other["choices"]] != texts
    alone = ok(server.url, "/completions", {**body, "prompt": PROMPTS[1]})
    assert [c["text"] for c in alone["choices"]] == texts[3:]  # a prompt's samples do not depend on its neighbours
    greedy = ok(server.url, "/completions", {**body, "temperature": 0})
    assert len({c["text"] for c in greedy["choices"][:3]}) == 1
    assert ok(server.url, "/completions", {**body, "temperature": 0, "seed": 99})["choices"] == greedy["choices"]


def test_tiny_top_p_is_greedy_and_high_temperature_spreads(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 6, "n": 4}
    greedy = ok(server.url, "/completions", {**body, "temperature": 0})["choices"]
    nucleus = ok(server.url, "/completions", {**body, "temperature": 1.5, "top_p": 1e-6, "seed": 1})["choices"]
    assert [c["text"] for c in nucleus] == [c["text"] for c in greedy]
    hot = ok(server.url, "/completions", {**body, "temperature": 2.0, "seed": 1})["choices"]
    assert len({c["text"] for c in hot}) == 4


def test_completion_logprobs_match_a_forward_pass(server, served_lm):
    model, tokenizer, _ = served_lm
    prompt = tokenizer(PROMPTS[1]).input_ids
    response = ok(server.url, "/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0.9, "seed": 3,
                                               "logprobs": 4, "return_tokens_as_token_ids": True})
    choice = response["choices"][0]
    generated = ids_of(choice)
    assert len(generated) == response["usage"]["completion_tokens"] or choice["finish_reason"] == "stop"
    reference = forward_logprobs(model, prompt + generated)
    for position, (token, logprob, top) in enumerate(zip(generated, choice["logprobs"]["token_logprobs"],
                                                         choice["logprobs"]["top_logprobs"])):
        row = reference[len(prompt) - 1 + position]
        assert logprob == pytest.approx(row[token].item(), abs=1e-4)
        entries = [(int(key.split(":")[1]), value) for key, value in top.items()]
        assert [v for _, v in entries] == sorted((v for _, v in entries), reverse=True)
        expected = row.topk(4)
        expected_ids = expected.indices.tolist()
        in_top = [(t, v) for t, v in entries if t in expected_ids]
        assert [t for t, _ in in_top] == expected_ids
        assert [v for _, v in in_top] == pytest.approx(expected.values.tolist(), abs=1e-4)
        assert token in dict(entries) and len(entries) == (4 if token in expected_ids else 5)


def test_chat_logprobs_match_a_forward_pass(server, served_lm):
    model, tokenizer, _ = served_lm
    messages = [{"role": "user", "content": "Define cat."}]
    response = ok(server.url, "/chat/completions", {"messages": messages, "max_tokens": 4, "logprobs": True,
                                                    "top_logprobs": 3, "temperature": 0,
                                                    "return_tokens_as_token_ids": True})
    content = response["choices"][0]["logprobs"]["content"]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False).input_ids
    generated = [int(entry["token"].split(":")[1]) for entry in content]
    reference = forward_logprobs(model, prompt + generated)
    for position, entry in enumerate(content):
        row = reference[len(prompt) - 1 + position]
        assert entry["logprob"] == pytest.approx(row[generated[position]].item(), abs=1e-4)
        assert generated[position] == int(row.argmax())  # greedy
        expected = row.topk(3)
        assert [int(t["token"].split(":")[1]) for t in entry["top_logprobs"]] == expected.indices.tolist()
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(expected.values.tolist(), abs=1e-4)
    raw = b"".join(bytes(entry["bytes"]) for entry in content)
    assert raw.decode("utf-8", errors="replace") == tokenizer.decode(generated)
    # without token ids, tokens are the decoded strings
    named = ok(server.url, "/chat/completions", {"messages": messages, "max_tokens": 4, "logprobs": True, "temperature": 0})
    assert [e["token"] for e in named["choices"][0]["logprobs"]["content"]] == [tokenizer.decode([t]) for t in generated]


def test_echo_prompt_logprobs_match_a_forward_pass(server, served_lm):
    model, tokenizer, _ = served_lm
    text = PROMPTS[2]
    prompt = tokenizer(text).input_ids
    response = ok(server.url, "/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = response["choices"][0]
    assert choice["text"] == text and response["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in prompt]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    reference = forward_logprobs(model, prompt)
    expected = [reference[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][-1] < len(text)
    # echo with generated tokens: the prompt comes first, then the completion
    both = ok(server.url, "/completions", {"prompt": text, "max_tokens": 3, "echo": True, "temperature": 0})
    alone = ok(server.url, "/completions", {"prompt": text, "max_tokens": 3, "temperature": 0})
    assert both["choices"][0]["text"] == text + alone["choices"][0]["text"]


def test_stop_sequences_cut_the_text(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "logprobs": 0}
    full = ok(server.url, "/completions", body)["choices"][0]
    text = full["text"]
    candidates = [i for i, c in enumerate(text) if i >= 1 and c.isascii() and c.isalnum()]
    assert candidates, f"greedy text without an ASCII letter to stop at: {text!r}"
    stop = text[candidates[0]]
    cut = ok(server.url, "/completions", {**body, "stop": ["\u2603never", stop]})["choices"][0]
    assert cut["text"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    assert len(cut["logprobs"]["tokens"]) < len(full["logprobs"]["tokens"])
    assert cut["logprobs"]["tokens"] == full["logprobs"]["tokens"][: len(cut["logprobs"]["tokens"])]


def test_bad_requests_get_openai_errors(server):
    url = server.url

    def error(path: str, body: Any = None, *, expect: int, param: Any = "unset", **kwargs: Any) -> dict:
        status, payload, headers = request(url, path, body, **kwargs)
        assert status == expect, payload
        assert set(payload["error"]) == {"message", "type", "param", "code"} and payload["error"]["message"]
        if param != "unset":
            assert payload["error"]["param"] == param, payload
        payload["headers"] = headers
        return payload

    assert error("/completions", raw=b"{not json", expect=400)["error"]["code"] == "invalid_json"
    error("/completions", raw=b"[1, 2]", expect=400)
    error("/completions", {"max_tokens": 3}, expect=400, param="prompt")
    error("/chat/completions", {"max_tokens": 3}, expect=400, param="messages")
    error("/chat/completions", {"messages": [{"content": "hi"}]}, expect=400, param="messages[0].role")
    error("/completions", {"prompt": "a", "temperature": 3}, expect=400, param="temperature")
    error("/completions", {"prompt": "a", "top_p": 0}, expect=400, param="top_p")
    error("/completions", {"prompt": "a", "max_tokens": "5"}, expect=400, param="max_tokens")
    error("/completions", {"prompt": "a", "max_tokens": 0}, expect=400, param="max_tokens")  # 0 only with echo
    error("/completions", {"prompt": "a", "n": 0}, expect=400, param="n")
    error("/completions", {"prompt": "a", "logprobs": 21}, expect=400, param="logprobs")
    error("/completions", {"prompt": "a", "stop": [""]}, expect=400, param="stop")
    error("/completions", {"prompt": [5, 100000]}, expect=400, param="prompt")
    error("/completions", {"prompt": "a", "stream": True}, expect=400, param="stream")
    error("/completions", {"prompt": "a", "top_k": 5}, expect=400, param="top_k")
    error("/completions", {"prompt": "a", "presence_penalty": 0.5}, expect=400, param="presence_penalty")
    error("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, expect=400,
          param="top_logprobs")
    error("/completions", {"prompt": "a", "model": "gpt-4"}, expect=404, param="model")
    assert error("/completions", {"prompt": "a", "max_tokens": 300}, expect=400,
                 param="max_tokens")["error"]["code"] == "context_length_exceeded"
    error("/completions", {"prompt": [5] * 300}, expect=400, param="prompt")
    error("/nothing", {}, expect=404)
    assert error("/completions", expect=405, method="GET")["headers"]["Allow"] == "POST"
    error("/models", {}, expect=405)
    # a body over the limit is refused from its Content-Length, before it is read
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(server.max_body_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    # the server still serves after all of these
    assert ok(url, "/completions", {"prompt": "a", "max_tokens": 1})["choices"]


def test_api_key(served_lm):
    model, tokenizer, name = served_lm
    lines: list[str] = []
    secret = "s3cret-key-value"
    with TeacherServer(model, tokenizer, name=name, api_key=secret, log=lines.append) as keyed:
        body = {"prompt": "A dog", "max_tokens": 2}
        status, payload, headers = request(keyed.url, "/completions", body)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key" and "Bearer" in headers["WWW-Authenticate"]
        status, payload, _ = request(keyed.url, "/completions", body, key="wrong")
        assert status == 401 and secret not in json.dumps(payload)
        assert request(keyed.url, "/models", key="wrong")[0] == 401
        assert request(keyed.url.replace("/v1", ""), "/stats")[0] == 401
        assert request(keyed.url.replace("/v1", ""), "/health")[0] == 200  # liveness needs no key
        assert ok(keyed.url, "/completions", body, key=secret)["choices"]
        assert ok(keyed.url, "/models", key=secret)["data"][0]["id"] == name
    assert lines and not any(secret in line or "wrong" in line or "A dog" in line for line in lines)


def test_concurrent_requests_are_batched_and_match_serial(served_lm):
    model, tokenizer, name = served_lm
    bodies = [{"prompt": PROMPTS[i % 3] + " " * (i // 3), "max_tokens": 5, "temperature": 0} for i in range(6)]
    bodies.append({"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 1.0, "seed": 11, "n": 2})
    with TeacherServer(model, tokenizer, name=name, max_batch_size=16, batch_wait_ms=2000) as batched:
        results: list[Any] = [None] * len(bodies)

        def send(index: int) -> None:
            results[index] = ok(batched.url, "/completions", bodies[index])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = batched.stats()
    assert stats["batches"] < len(bodies) and stats["largest_batch"] > 1 and stats["mean_batch_size"] > 1
    assert stats["sequences"] == len(bodies) + 1
    with TeacherServer(model, tokenizer, name=name, max_batch_size=1, batch_wait_ms=0) as serial:
        for body, result in zip(bodies, results):
            expected = ok(serial.url, "/completions", body)
            assert [c["text"] for c in result["choices"]] == [c["text"] for c in expected["choices"]]
        assert serial.stats()["largest_batch"] == 1


def test_internal_error_is_500_and_the_server_recovers(server, monkeypatch):
    calls = {"count": 0}
    original = server.model.forward

    def broken(*args: Any, **kwargs: Any) -> Any:
        calls["count"] += 1
        raise RuntimeError("simulated failure inside the model")

    monkeypatch.setattr(server.model, "forward", broken)
    status, payload, _ = request(server.url, "/completions", {"prompt": "A dog", "max_tokens": 2})
    assert status == 500 and calls["count"] == 1
    assert payload["error"]["type"] == "server_error" and "simulated failure" in payload["error"]["message"]
    monkeypatch.setattr(server.model, "forward", original)
    assert ok(server.url, "/completions", {"prompt": "A dog", "max_tokens": 2})["choices"]
    assert server.stats()["failed_batches"] >= 1 and server.stats()["requests"]["errors_5xx"] >= 1
    assert any("simulated failure" in line for line in server.lines)


def test_access_log_has_no_prompt_text(server):
    ok(server.url, "/completions", {"prompt": "A cat is a small feline", "max_tokens": 1})
    assert any('"POST /v1/completions" 200' in line for line in server.lines)
    assert not any("small feline" in line for line in server.lines)


# -- loading ---------------------------------------------------------------------------------------


def test_load_served_model_sources_and_errors(tiny_lm, tmp_path):
    model, tokenizer, name = load_served_model(str(tiny_lm["student"]))
    assert name == "student" and not model.training and model.config.num_hidden_layers == 1
    assert tokenizer.chat_template
    with pytest.raises(ValueError, match="--stage picks a stage of a run folder"):
        load_served_model(str(tiny_lm["student"]), stage="kd")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_served_model(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_served_model(str(tmp_path / "missing.gguf"))
    from transformers import ViTConfig, ViTModel

    vision = tmp_path / "vision"
    ViTModel(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, image_size=8,
                       patch_size=4)).save_pretrained(vision)
    for item in Path(tiny_lm["tokenizer"]).iterdir():
        shutil.copy(item, vision / item.name)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_served_model(str(vision))
    with pytest.raises(ValueError, match="unknown device 'banana'"):
        load_served_model(str(tiny_lm["student"]), device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_served_model(str(tiny_lm["student"]), device="cuda")


def test_serve_a_finished_run(tiny_lm, tmp_path, single_thread):
    from distill.config import load_experiment
    from distill.engine.runner import run_experiment
    from tests.lm_fixtures import tiny_lm_experiment

    experiment = tiny_lm_experiment(tiny_lm, tmp_path / "runs", training={"epochs": 1, "max_steps": 1})
    run_dir = run_experiment(load_experiment(experiment), write_report=False).run_dir
    model, tokenizer, name = load_served_model(str(run_dir))
    assert name == f"{run_dir.name}:kd" and model.config.num_hidden_layers == 1
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "stages" / "kd" / "model.safetensors"))
    assert torch.equal(model.model.embed_tokens.weight, saved["model.model.embed_tokens.weight"])
    assert load_served_model(str(run_dir), stage="kd")[2] == name
    with pytest.raises(ConfigError, match="'nope' is not a stage"):
        load_served_model(str(run_dir), stage="nope")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "stages" / "kd" / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="has not finished"):
        load_served_model(str(broken), stage="kd")
    with pytest.raises(ConfigError, match="no stage of the run"):
        load_served_model(str(broken))
    with TeacherServer(model, tokenizer, name=name) as running:
        response = ok(running.url, "/chat/completions", {"model": name, "messages": [{"role": "user", "content": "Define dog."}],
                                                         "max_tokens": 3, "temperature": 0})
        assert response["model"] == name and response["choices"][0]["finish_reason"] in ("stop", "length")


# -- command ---------------------------------------------------------------------------------------


def test_api_key_from_env(monkeypatch):
    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    assert api_key_from_env(None) is None
    monkeypatch.setenv("DISTILL_API_KEY", "k1")
    assert api_key_from_env(None) == "k1"
    monkeypatch.setenv("MY_SERVE_KEY", "k2")
    assert api_key_from_env("MY_SERVE_KEY") == "k2"
    with pytest.raises(ValueError, match="MY_MISSING_KEY is not set"):
        api_key_from_env("MY_MISSING_KEY")
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_command_serve_runs_and_stops_on_ctrl_c(tiny_lm):
    script = (
        "import argparse, sys\n"
        "from rich.console import Console\n"
        "from distill.serve.cli import add_serve_parser, command_serve\n"
        "parser = argparse.ArgumentParser(prog='distill')\n"
        "add_serve_parser(parser.add_subparsers(dest='command'))\n"
        "sys.exit(command_serve(parser.parse_args(sys.argv[1:]), Console(stderr=True, width=200)))\n"
    )
    env = {**os.environ, "DISTILL_API_KEY": "cli-key", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-c", script, "serve", str(tiny_lm["teacher"]), "--port", "0", "--name", "tiny", "--max-new-tokens", "8"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        url = None
        seen: list[str] = []
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
            url = match.group(0) if match else None
        assert url, "".join(seen)
        assert request(url, "/models")[0] == 401
        assert ok(url, "/models", key="cli-key")["data"][0]["id"] == "tiny"
        status, payload, _ = request(url, "/completions", {"prompt": "A", "max_tokens": 9}, key="cli-key")
        assert status == 400 and payload["error"]["param"] == "max_tokens"
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "stopped" in rest and "cli-key" not in "".join(seen) + rest


def test_stopping_mid_batch_ends_the_decoding_and_answers_503(served_lm, monkeypatch):
    """No decoding outlives the server: a batch in flight ends at its next step (a daemon thread
    still running torch code at interpreter exit can abort the process)."""
    import threading
    import time

    model, tokenizer, name = served_lm
    original = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow)
    server = TeacherServer(model, tokenizer, name=name)
    server.start()
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(request(server.url, "/completions", {"prompt": "A dog", "max_tokens": 60}))
    )
    thread.start()
    time.sleep(0.5)  # the batch is decoding: 60 steps of at least 50 ms each
    started = time.monotonic()
    server.stop()
    thread.join(10)
    assert time.monotonic() - started < 2.0  # not the 3 s the batch still had to run
    assert server.worker._thread is None
    assert answers and answers[0][0] == 503
