"""The black-box teacher client against a scriptable OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from distill.blackbox import (
    EndpointSpec,
    ResponseCache,
    TeacherAPIError,
    TeacherClient,
    cache_key,
    choice_logprobs,
    choice_texts,
    finish_reasons,
)
from tests.fake_openai import FakeOpenAI

pytestmark = pytest.mark.usefixtures("no_proxy")

KEY = "sk-test-SECRET-5f3a9c0d1e2b"


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


class Sleeps(list):
    """A sleeper that records the waits instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class Highest:
    """An rng whose uniform(a, b) is b: the jitter's upper bound, to check the schedule."""

    def uniform(self, low: float, high: float) -> float:
        return high


def client_of(server: FakeOpenAI, **fields: Any) -> tuple[TeacherClient, Sleeps, list[str]]:
    sleeps, lines = Sleeps(), []
    log = fields.pop("log", lines.append)
    rng = fields.pop("rng", None)
    client = TeacherClient.from_url(server.url, sleep=sleeps, log=log, rng=rng, **fields)
    return client, sleeps, lines


# ---------------------------------------------------------------------------------------- success


def test_complete_sends_the_request_and_reads_the_answer(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", KEY)
    client, sleeps, lines = client_of(server, api_key_env="TEACHER_KEY", extra_headers={"X-Team": "kd"})
    response = client.complete("Once upon", n=2, temperature=0.7, max_tokens=5, stop=["\n"], seed=3, user="u1")

    assert [request["path"] for request in server.requests] == ["/v1/models", "/v1/completions"]
    sent = server.requests[1]
    assert sent["body"] == {
        "model": "teacher-a", "prompt": "Once upon", "n": 2, "temperature": 0.7, "top_p": 1.0,
        "max_tokens": 5, "stop": ["\n"], "seed": 3, "user": "u1",
    }  # fmt: skip
    headers = {name.lower(): value for name, value in sent["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"] == "application/json"
    assert headers["x-team"] == "kd"
    # the server lists its choices backwards; the helpers follow `index`
    assert choice_texts(response) == ["Once upon->1.0", "Once upon->1.1"]
    assert finish_reasons(response) == ["stop", "length"]
    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures, stats.cache_hits) == (2, 0, 0, 0)
    assert (stats.prompt_tokens, stats.completion_tokens, stats.total_tokens) == (9, 4, 13)
    assert client.model_name() == "teacher-a" and len(server.requests) == 2  # asked once
    assert sleeps == [] and any("teacher-a" in line for line in lines)


def test_no_key_configured_sends_no_authorization(server: FakeOpenAI) -> None:
    client, _, _ = client_of(server, model="teacher-b")
    response = client.complete([5, 7, 11], max_tokens=2)
    assert server.requests[0]["path"] == "/v1/completions"  # a given model needs no /models
    assert server.requests[0]["body"]["prompt"] == [5, 7, 11]
    assert server.requests[0]["body"]["model"] == "teacher-b"
    assert "authorization" not in {name.lower() for name in server.requests[0]["headers"]}
    assert choice_texts(response) == ["[5, 7, 11]->1.0"]
    assert client.models() == ["teacher-a", "teacher-b"]


def test_chat_and_logprobs_in_both_shapes(server: FakeOpenAI) -> None:
    client, _, _ = client_of(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat(messages, logprobs=True, top_logprobs=2, temperature=0)
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    assert server.requests[-1]["body"]["temperature"] == 0.0 and server.requests[-1]["body"]["top_logprobs"] == 2
    assert choice_texts(chat) == ["Hi->1.0"]
    assert choice_logprobs(chat) == [
        [
            {"token": "Hi", "logprob": -0.25, "top_logprobs": {"Hi": -0.25, "other": -3.0}},
            {"token": "->1.0", "logprob": -0.5, "top_logprobs": {"->1.0": -0.5, "other": -3.0}},
        ]
    ]
    completion = client.complete("Hey", logprobs=1, n=2)
    tokens = choice_logprobs(completion)
    assert [[token["token"] for token in choice] for choice in tokens] == [["Hey", "->2.0"], ["Hey", "->2.1"]]
    assert tokens[1][1] == {"token": "->2.1", "logprob": -0.5, "top_logprobs": {"->2.1": -0.5}}
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        client.chat(messages, top_logprobs=3)
    with pytest.raises(ValueError, match="carries no logprobs"):
        choice_logprobs(client.complete("no logprobs asked"))


def test_logprob_helpers_read_echoed_prompts_and_merge_duplicate_alternatives() -> None:
    completion = {
        "choices": [
            {
                "index": 0,
                "text": "ab",
                "logprobs": {"tokens": ["a", "b"], "token_logprobs": [None, -1.5], "top_logprobs": [None, {"b": -1.5}]},
            }
        ]
    }
    assert choice_logprobs(completion) == [
        [
            {"token": "a", "logprob": None, "top_logprobs": {}},
            {"token": "b", "logprob": -1.5, "top_logprobs": {"b": -1.5}},
        ]
    ]
    chat = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None},
                "logprobs": {
                    "content": [
                        {
                            "token": "\ufffd",
                            "logprob": -0.1,
                            "top_logprobs": [
                                {"token": "\ufffd", "logprob": -0.1},
                                {"token": "\ufffd", "logprob": -2.0},
                            ],
                        }
                    ]
                },
            }
        ]
    }
    assert choice_logprobs(chat)[0][0]["top_logprobs"] == {"\ufffd": -0.1}
    assert choice_texts(chat) == [""]
    with pytest.raises(TypeError, match="no 'choices'"):
        choice_texts({"error": "x"})


# ---------------------------------------------------------------------------------------- retries


def test_429_waits_as_long_as_retry_after_says(server: FakeOpenAI) -> None:
    server.fail(429, times=2, headers={"Retry-After": "1.5"})
    client, sleeps, lines = client_of(server, model="teacher-a")
    assert choice_texts(client.complete("x")) == ["x->1.0"]
    assert sleeps == [1.5, 1.5]
    stats = client.stats
    assert (stats.requests, stats.retries, stats.failures, stats.backoff_s) == (3, 2, 0, 3.0)
    assert sum("HTTP 429" in line and "retry" in line for line in lines) == 2


def test_retry_after_is_capped_and_read_in_every_form(server: FakeOpenAI) -> None:
    server.fail(429, headers={"Retry-After": "100"})
    server.fail(503, headers={"retry-after-ms": "250"})
    server.fail(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # in the past: no wait
    client, sleeps, _ = client_of(server, model="teacher-a", backoff_initial_s=0.5, backoff_max_s=2.0)
    client.complete("x")
    assert sleeps == [2.0, 0.25, 0.0]


def test_500_three_times_then_success_backs_off_exponentially(server: FakeOpenAI) -> None:
    server.fail(500, times=3)
    client, sleeps, _ = client_of(server, model="teacher-a", rng=Highest(), backoff_initial_s=0.5, backoff_max_s=1.5)
    assert choice_texts(client.complete("x")) == ["x->1.0"]
    assert client.stats.retries == 3 and client.stats.requests == 4
    assert sleeps == [0.5, 1.0, 1.5]  # upper bounds 0.5 * 2**k, capped at backoff_max_s


def test_jitter_is_random_below_the_bound(server: FakeOpenAI) -> None:
    server.fail(502, times=4)
    client, sleeps, _ = client_of(server, model="teacher-a", backoff_initial_s=1.0, backoff_max_s=30.0)
    client.complete("x")
    assert len(sleeps) == 4 and len(set(sleeps)) == 4
    assert all(0.0 <= wait <= 2.0**k for k, wait in enumerate(sleeps))


@pytest.mark.parametrize("status", [408, 409, 502, 503])
def test_transient_statuses_are_retried(server: FakeOpenAI, status: int) -> None:
    server.fail(status, times=1)
    client, sleeps, _ = client_of(server, model="teacher-a")
    client.complete("x")
    assert len(sleeps) == 1 and client.stats.requests == 2


def test_500_forever_fails_after_max_retries_with_the_message(server: FakeOpenAI) -> None:
    server.fail(500, times=None, message="the teacher ran out of memory")
    client, sleeps, _ = client_of(server, model="teacher-a", max_retries=2)
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("x")
    error = caught.value
    assert error.status == 500 and error.attempts == 3 and error.url == f"{server.url}/completions"
    assert "the teacher ran out of memory" in str(error) and "after 3 attempts" in str(error)
    assert len(server.posts()) == 3 and len(sleeps) == 2
    assert client.stats.failures == 1


def test_400_is_not_retried_and_carries_the_servers_message(server: FakeOpenAI) -> None:
    server.fail(400, message="This model's maximum context length is 2048 tokens")
    client, sleeps, _ = client_of(server, model="teacher-a")
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("x")
    assert caught.value.status == 400 and caught.value.attempts == 1
    assert str(caught.value) == (
        f"HTTP 400 from {server.url}/completions: This model's maximum context length is 2048 tokens"
    )
    assert len(server.posts()) == 1 and sleeps == []
    assert client.stats.failures == 1


def test_401_names_the_keys_variable_or_says_none_is_set(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", KEY)
    server.fail(401, message="Invalid token")
    client, sleeps, _ = client_of(server, model="teacher-a", api_key_env="TEACHER_KEY")
    with pytest.raises(TeacherAPIError, match=r"HTTP 401 .*Invalid token \(check the key in \$TEACHER_KEY\)"):
        client.complete("x")
    server.fail(401, message="Missing bearer token")
    anonymous, _, _ = client_of(server, model="teacher-a")
    with pytest.raises(TeacherAPIError, match="no API key is configured: set api_key_env"):
        anonymous.complete("x")
    assert sleeps == [] and len(server.posts()) == 2


def test_404_of_an_unknown_model_suggests_what_to_check(server: FakeOpenAI) -> None:
    client, _, _ = client_of(server, model="no-such-model")
    with pytest.raises(TeacherAPIError, match=r"'no-such-model' does not exist \(check base_url.*model name\)"):
        client.complete("x")


def test_timeouts_are_retried_then_raised_with_real_sleeps(server: FakeOpenAI) -> None:
    server.hang(5.0, times=1)
    client = TeacherClient.from_url(server.url, model="teacher-a", timeout_s=0.3, backoff_initial_s=0.02)
    start = time.monotonic()
    assert choice_texts(client.complete("x")) == ["x->1.0"]
    assert 0.3 <= time.monotonic() - start < 2.5
    assert client.stats.retries == 1

    server.hang(5.0, times=None)
    stubborn = TeacherClient.from_url(
        server.url, model="teacher-a", timeout_s=0.2, max_retries=1, backoff_initial_s=0.02
    )
    start = time.monotonic()
    with pytest.raises(TeacherAPIError) as caught:
        stubborn.complete("x")
    assert 0.4 <= time.monotonic() - start < 2.5
    assert caught.value.status is None and "timed out after 0.2 s" in str(caught.value)
    assert str(caught.value).startswith("no answer from ")


def test_dropped_connections_and_non_json_answers_are_retried(server: FakeOpenAI) -> None:
    server.drop(times=2)
    server.raw(200, b"<html>gateway hiccup</html>")
    client, sleeps, lines = client_of(server, model="teacher-a")
    assert choice_texts(client.complete("x")) == ["x->1.0"]
    assert len(sleeps) == 3 and client.stats.requests == 4
    assert any("not JSON" in line for line in lines)


def test_refused_connection_is_retried_then_raised() -> None:
    with FakeOpenAI() as gone:
        url = gone.url
    sleeps = Sleeps()
    client = TeacherClient.from_url(url, model="teacher-a", max_retries=2, sleep=sleeps)
    with pytest.raises(TeacherAPIError, match="no answer .* after 3 attempts: .*ConnectionRefused"):
        client.complete("x")
    assert len(sleeps) == 2


def test_redirects_are_not_followed(server: FakeOpenAI) -> None:
    server.fail(307, headers={"Location": "http://elsewhere.example/v1/completions?token=abc"})
    client, _, _ = client_of(server, model="teacher-a")
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("x")
    assert "redirected to http://elsewhere.example/v1/completions;" in str(caught.value)
    assert "token=abc" not in str(caught.value)
    assert len(server.requests) == 1


def test_an_answer_without_choices_is_an_error(server: FakeOpenAI) -> None:
    server.raw(200, b'{"object": "list", "data": []}')
    client, _, _ = client_of(server, model="teacher-a", cache_dir=None)
    with pytest.raises(TeacherAPIError, match="no 'choices' list"):
        client.complete("x")


# ---------------------------------------------------------------------------------------- map


def test_map_bounds_concurrency_keeps_order_and_reports_progress() -> None:
    with FakeOpenAI(delay=0.05) as server:
        client, _, _ = client_of(server, model="teacher-a", max_concurrency=4)
        seen: list[tuple[int, int]] = []
        prompts = [f"p{index}" for index in range(20)]
        requests = [{"prompt": p, "max_tokens": 3} for p in prompts]
        responses = client.map("complete", requests, progress=lambda *a: seen.append(a))
    assert [choice_texts(response)[0].split("->")[0] for response in responses] == prompts
    assert 2 <= server.max_in_flight <= 4
    assert seen == [(done, 20) for done in range(1, 21)]
    assert client.stats.requests == 20


def test_concurrency_bound_holds_across_threads() -> None:
    with FakeOpenAI(delay=0.05) as server:
        client, _, _ = client_of(server, model="teacher-a", max_concurrency=2)
        batches = [[{"messages": [{"role": "user", "content": f"{t}-{i}"}]} for i in range(4)] for t in range(3)]
        threads = [threading.Thread(target=client.map, args=("chat", batch)) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(server.posts()) == 12 and server.max_in_flight == 2


def test_map_names_the_failing_request(server: FakeOpenAI) -> None:
    server.fail(400, times=None, message="bad prompt", match=lambda body: bool(body) and body.get("prompt") == "p7")
    client, _, _ = client_of(server, model="teacher-a", max_concurrency=2)
    requests = [{"prompt": f"p{index}"} for index in range(10)]
    with pytest.raises(TeacherAPIError) as caught:
        client.map("complete", requests)
    assert caught.value.index == 7
    assert str(caught.value) == f"request 7: HTTP 400 from {server.url}/completions: bad prompt"

    results = client.map("complete", requests, return_exceptions=True)
    assert isinstance(results[7], TeacherAPIError) and results[7].index == 7
    assert [choice_texts(result)[0].split("->")[0] for i, result in enumerate(results) if i != 7] == [
        f"p{index}" for index in range(10) if index != 7
    ]


def test_map_checks_every_request_before_sending(server: FakeOpenAI) -> None:
    client, _, _ = client_of(server, model="teacher-a")
    with pytest.raises(TypeError, match=r"request 3: complete\(\) needs 'prompt'"):
        client.map("complete", [{"prompt": "a"}] * 3 + [{"promt": "typo"}])
    with pytest.raises(TypeError, match="request 1: prompt must be a string or a list of token ids"):
        client.map("complete", [{"prompt": "a"}, {"prompt": [1, "2"]}])
    with pytest.raises(TypeError, match=r"request 0: messages\[1\] must be a dict with a 'role'"):
        client.map("chat", [{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}])
    with pytest.raises(ValueError, match="request 0: stream=True is not supported"):
        client.map("complete", [{"prompt": "a", "stream": True}])
    with pytest.raises(ValueError, match="method must be 'complete' or 'chat'"):
        client.map("embed", [])
    assert server.requests == []


# ---------------------------------------------------------------------------------------- cache


def test_a_rerun_is_answered_from_the_cache_with_the_server_gone(tmp_path: Path) -> None:
    requests = [{"prompt": f"p{index}", "temperature": 1.0} for index in range(20)]
    with FakeOpenAI() as server:
        first, _, _ = client_of(server, model="teacher-a", cache_dir=tmp_path / "cache", max_concurrency=4)
        answers = first.map("complete", requests)
        url = server.url
    assert first.stats.requests == 20
    assert len(list((tmp_path / "cache").glob("*/*.json"))) == 20
    again = TeacherClient.from_url(url, model="teacher-a", cache_dir=tmp_path / "cache", max_retries=0)
    assert again.map("complete", requests) == answers  # the same samples, serial numbers included
    assert (again.stats.requests, again.stats.cache_hits) == (0, 20)
    # temperature 1 and 1.0 are one request
    assert again.complete("p3", temperature=1) == answers[3]


def test_cache_bypass_and_salt(server: FakeOpenAI, tmp_path: Path) -> None:
    client, _, _ = client_of(server, model="teacher-a", cache_dir=tmp_path)
    first = client.complete("x")
    assert client.complete("x") == first and len(server.posts()) == 1
    fresh = client.complete("x", cache=False)
    assert fresh != first and len(server.posts()) == 2
    assert client.complete("x") == first  # cache=False did not write
    salted = client.complete("x", cache_salt="draw-2")
    assert salted != first and len(server.posts()) == 3
    assert "cache_salt" not in server.posts()[-1]["body"]
    assert client.complete("x", cache_salt="draw-2") == salted and len(server.posts()) == 3


def test_identical_requests_of_a_map_are_sent_once(server: FakeOpenAI, tmp_path: Path) -> None:
    server.delay = 0.1  # all three in flight at once: the cache alone would not catch the duplicate
    client, _, _ = client_of(server, model="teacher-a", cache_dir=tmp_path)
    results = client.map("complete", [{"prompt": "same"}, {"prompt": "other"}, {"prompt": "same"}])
    assert len(server.posts()) == 2 and results[0] == results[2] and results[0] is not results[2]
    assert client.stats.cache_hits == 1
    uncached, _, _ = client_of(server, model="teacher-a")
    results = uncached.map("complete", [{"prompt": "same"}] * 2)
    assert results[0] != results[1]  # without a cache every request is its own sample


def test_damaged_cache_entries_are_refetched_and_replaced(server: FakeOpenAI, tmp_path: Path) -> None:
    client, _, lines = client_of(server, model="teacher-a", cache_dir=tmp_path)
    a, b = client.complete("a"), client.complete("b")
    cache = ResponseCache(tmp_path)
    file_a = cache.file(cache_key("/completions", server.posts()[0]["body"]))
    file_b = cache.file(cache_key("/completions", server.posts()[1]["body"]))
    file_a.write_text(file_a.read_text()[:40])  # truncated
    record = json.loads(file_b.read_text())
    record["key"]["request"]["prompt"] = "not b"  # another request's answer under b's name
    file_b.write_text(json.dumps(record))
    again, _, lines = client_of(server, model="teacher-a", cache_dir=tmp_path)
    new_a, new_b = again.complete("a"), again.complete("b")
    assert len(server.posts()) == 4 and new_a != a and new_b != b
    assert any(str(file_a) in line and "not valid JSON" in line for line in lines)
    assert any(str(file_b) in line and "another request" in line for line in lines)
    third, _, lines = client_of(server, model="teacher-a", cache_dir=tmp_path)
    assert third.complete("a") == new_a and third.complete("b") == new_b and lines == []
    assert len(server.posts()) == 4
    assert [path.name for path in tmp_path.rglob(".*")] == []  # no temporary file left behind


# ---------------------------------------------------------------------------------------- the key


def test_the_key_never_leaks(server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEACHER_KEY", KEY)
    lines: list[str] = []
    client = TeacherClient.from_url(
        server.url, api_key_env="TEACHER_KEY", cache_dir=tmp_path / "cache", log=lines.append, sleep=lambda s: None
    )
    server.fail(503, message=f"overloaded; key {KEY} is rate limited")
    client.complete("x")
    server.fail(401, message=f"Incorrect API key provided: {KEY}")
    with pytest.raises(TeacherAPIError) as caught:
        client.complete("y")
    error = caught.value
    assert any(request["headers"].get("Authorization") == f"Bearer {KEY}" for request in server.requests)
    texts = [
        repr(client), str(client), repr(client.spec), client.spec.model_dump_json(), str(error), repr(error),
        error.message, "\n".join(lines), str(pickle.loads(pickle.dumps(error))), repr(vars(client)),
    ]
    stored = [path.read_text() for path in (tmp_path / "cache").rglob("*") if path.is_file()]
    assert len(stored) == 1 and "x->" in stored[0] and len(lines) >= 2  # the model and the retry
    texts += stored
    assert not [text for text in texts if KEY in text or KEY[3:] in text]
    assert "<redacted>" in str(error) and "$TEACHER_KEY" in repr(client)
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(client)


def test_missing_or_empty_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TEACHER_KEY", raising=False)
    with pytest.raises(ValueError, match=r"'NO_SUCH_TEACHER_KEY', which is not set: export NO_SUCH_TEACHER_KEY="):
        TeacherClient.from_url("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_TEACHER_KEY")
    monkeypatch.setenv("NO_SUCH_TEACHER_KEY", "  ")
    with pytest.raises(ValueError, match="'NO_SUCH_TEACHER_KEY', which is empty"):
        TeacherClient.from_url("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_TEACHER_KEY")
    monkeypatch.setenv("NO_SUCH_TEACHER_KEY", "sk-abc\ndef")
    with pytest.raises(ValueError, match="control") as caught:
        TeacherClient.from_url("http://127.0.0.1:9/v1", api_key_env="NO_SUCH_TEACHER_KEY")
    assert "sk-abc" not in str(caught.value)


def test_endpoint_spec_rejects_bad_settings_without_echoing_them() -> None:
    spec = EndpointSpec(base_url="https://api.example.com/v1/")
    assert spec.base_url == "https://api.example.com/v1" and spec.max_concurrency == 8 and spec.cache_dir is None
    bad = [
        ({"base_url": "ftp://host/v1"}, "http:// or https://"),
        ({"base_url": "https://user:sk-live-1@host/v1"}, "must not hold credentials"),
        ({"base_url": "https://host/v1?api_key=sk-live-1"}, "query string"),
        ({"base_url": "http://h/v1", "api_key_env": "sk-live-1"}, "not the key itself"),
        ({"base_url": "http://h/v1", "extra_headers": {"Authorization": "Bearer sk-live-1"}}, "api_key_env"),
        ({"base_url": "http://h/v1", "max_concurrency": 0}, "greater than or equal to 1"),
        ({"base_url": "http://h/v1", "backoff_initial_s": 5, "backoff_max_s": 1}, "backoff_max_s"),
        ({"base_url": "http://h/v1", "api_key": "sk-live-1"}, "Extra inputs are not permitted"),
    ]
    for fields, message in bad:
        with pytest.raises(ValidationError, match=re.escape(message)) as caught:
            EndpointSpec(**fields)
        assert "sk-live-1" not in str(caught.value), fields


# ---------------------------------------------------------------------------------------- docs


def test_the_python_example_of_the_page_runs(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """docs/blackbox.md: the example runs against a server, and its second run sends nothing but /models."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "blackbox.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    monkeypatch.setenv("DISTILL_TEACHER_URL", server.url)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for _ in range(2):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "blackbox.md", "exec"), {})  # noqa: S102 - our own documentation
        outputs.append(out.getvalue().splitlines())
    first, second, counts = outputs[0]
    serials = {
        re.fullmatch(r"'The capital of France is' -> 'The capital of France is->(\d)\.0' \(2 tokens\)", first)[1],
        re.fullmatch(r"'2 \+ 2 =' -> '2 \+ 2 =->(\d)\.0' \(2 tokens\)", second)[1],
    }  # the two requests run concurrently: either may be served first
    assert serials == {"1", "2"} and counts == "3 0"
    assert outputs[1] == outputs[0][:2] + ["1 2"]
    assert "`3 0` the first time" in page and "`1 2` when run again" in page
