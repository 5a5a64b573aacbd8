"""A client for black-box teachers: any server that speaks the OpenAI HTTP API.

Black-box distillation sees a teacher only through its outputs: sampled texts and, where the
server returns them, the log-probabilities of the sampled tokens and of the few most likely
alternatives. :class:`TeacherClient` sends those requests (``/completions``, ``/chat/completions``,
``/models``) to vLLM, llama.cpp, TGI, Ollama, ``distill serve`` or a hosted API, with

* bounded concurrency (:meth:`TeacherClient.map` runs many requests through a thread pool, with
  at most ``max_concurrency`` requests in flight across all callers of one client);
* retries of transient failures (HTTP 408, 409, 429, 5xx, refused or dropped connections,
  timeouts) with capped exponential backoff and full jitter (Brooker, "Exponential Backoff And
  Jitter", AWS Architecture Blog, 2015), honouring ``Retry-After`` (RFC 9110, sec. 10.2.3);
  other 4xx answers fail at once with the server's own message;
* a content-addressed response cache (:mod:`distill.blackbox.response_cache`) so that a rerun of
  a data-generation pipeline sends nothing it already paid for;
* an API key read from an environment variable and kept out of every log line, exception,
  ``repr`` and cache file.

The request and response shapes are those of the OpenAI API reference (Completions and Chat
Completions, https://platform.openai.com/docs/api-reference). Only the standard library's
``urllib`` is used for HTTP. Redirects are not followed (the key must not travel to another
host, and a redirected POST loses its body); a redirect is an error naming the new location.
"""

from __future__ import annotations

import copy
import email.utils
import http.client
import inspect
import json
import numbers
import os
import random
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill import __version__
from distill.blackbox.response_cache import ResponseCache, cache_key

__all__ = [
    "ClientStats",
    "EndpointSpec",
    "TeacherAPIError",
    "TeacherClient",
    "choice_logprobs",
    "choice_texts",
    "finish_reasons",
]

_RETRIED_4XX = frozenset({408, 409, 429})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_KEY_HEADERS = frozenset({"authorization", "proxy-authorization", "api-key", "x-api-key"})
_MESSAGE_LIMIT = 1000


class EndpointSpec(BaseModel):
    """Where a black-box teacher lives and how to talk to it.

    The API key is never a field: ``api_key_env`` names the environment variable that holds it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    base_url: str = Field(
        description="root of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (http or https; "
        "no credentials, query or fragment)"
    )
    model: str | None = Field(
        default=None, description="model name sent with every request; default: the first of /models"
    )
    api_key_env: str | None = Field(
        default=None,
        description="name of the environment variable holding the API key (sent as 'Authorization: Bearer'); "
        "none: no key is sent",
    )
    max_concurrency: int = Field(default=8, ge=1, description="requests in flight at once, at most")
    max_retries: int = Field(default=5, ge=0, description="retries of a request after a transient failure")
    backoff_initial_s: float = Field(
        default=0.5, ge=0.0, description="cap of the first retry's random wait; doubles with every retry"
    )
    backoff_max_s: float = Field(default=30.0, ge=0.0, description="longest wait before a retry, Retry-After included")
    timeout_s: float = Field(default=60.0, gt=0.0, description="socket timeout of one attempt (connect, and each read)")
    cache_dir: Path | None = Field(default=None, description="folder of the response cache; none: no cache")
    extra_headers: dict[str, str] = Field(
        default_factory=dict, description="headers added to every request (not the key: see api_key_env)"
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip()
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials (user:password@); name the key's variable in api_key_env")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        parts.port  # noqa: B018 - raises ValueError on a port out of range
        return value.rstrip("/")

    @field_validator("cache_dir")
    @classmethod
    def _expand_cache_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("api_key_env")
    @classmethod
    def _check_env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(
                "must be the name of an environment variable (letters, digits, underscores), not the key itself"
            )
        return value

    @field_validator("extra_headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _KEY_HEADERS:
                raise ValueError(f"{name!r} would put a secret in the config; name the key's variable in api_key_env")
            if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text) or not text.isascii():
                raise ValueError(f"the value of header {name!r} holds a control or non-ASCII character")
        return value

    @model_validator(mode="after")
    def _check_backoff(self) -> EndpointSpec:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s ({self.backoff_initial_s})"
            )
        return self


class TeacherAPIError(RuntimeError):
    """A request that failed: the server's answer (``status``, its error ``message``) or no answer.

    ``status`` is ``None`` when no HTTP answer came (refused or dropped connection, timeout).
    ``url`` never holds a secret (``base_url`` cannot). ``attempts`` counts the requests sent;
    ``index`` is the request's position when it came from :meth:`TeacherClient.map`.
    """

    def __init__(
        self, status: int | None, message: str, url: str, *, attempts: int = 1, index: int | None = None
    ) -> None:
        super().__init__(status, message, url)
        self.status = status
        self.message = message
        self.url = url
        self.attempts = attempts
        self.index = index

    def __str__(self) -> str:
        where = f"request {self.index}: " if self.index is not None else ""
        answer = f"HTTP {self.status}" if self.status is not None else "no answer"
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{where}{answer} from {self.url}{tries}: {self.message}"

    def __reduce__(self) -> Any:
        return (type(self), (self.status, self.message, self.url), {"attempts": self.attempts, "index": self.index})

    def for_request(self, index: int) -> TeacherAPIError:
        """A copy naming the request's position in a :meth:`TeacherClient.map` call."""
        named = copy.copy(self)
        named.index = index
        return named


@dataclass
class ClientStats:
    """What a :class:`TeacherClient` has done so far.

    ``requests`` counts HTTP requests sent (every attempt, ``/models`` included); ``cache_hits``
    requests answered without sending (from the cache, or a duplicate of another request of the
    same :meth:`~TeacherClient.map` call); ``retries`` the attempts that followed a transient
    failure; ``failures`` the requests that failed for good; ``backoff_s`` the seconds spent
    waiting before retries. The token counts add up the ``usage`` of responses actually received
    (cache hits cost nothing and add nothing).
    """

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    backoff_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Secret:
    """A string that does not show itself in ``repr``, ``str`` or pickles."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an API key is not picklable")


class _Transient(Exception):
    """A failure worth retrying (internal)."""

    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class _Cancelled(Exception):
    """A map() request abandoned because another one failed (internal)."""


@dataclass(frozen=True)
class _Job:
    path: str
    body: dict[str, Any]
    cache: bool
    salt: str | None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _read_key(name: str | None) -> _Secret | None:
    if name is None:
        return None
    value = os.environ.get(name)
    if value is None:
        raise ValueError(
            f"api_key_env names the environment variable {name!r}, which is not set: "
            f"export {name}=<API key> (the key itself is never part of a config)"
        )
    value = value.strip()
    if not value:
        raise ValueError(f"api_key_env names the environment variable {name!r}, which is empty")
    if not all(0x21 <= ord(char) <= 0x7E for char in value):
        raise ValueError(
            f"the API key in ${name} holds a space, a control or a non-ASCII character; it cannot be sent as a header"
        )
    return _Secret(value)


def _call_arguments(method: Callable[..., Any], first: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``method(first, **arguments)`` by name, defaults filled in from ``method``'s
    signature (the one place they are stated); ``extra`` holds the keys it does not name."""
    bound = inspect.signature(method).bind(first, **arguments)
    bound.apply_defaults()
    return bound.arguments


class TeacherClient:
    """Requests to a black-box teacher behind an OpenAI-compatible endpoint.

    ``log`` receives one line per notable event (the model chosen, a retry, a damaged cache
    entry); ``sleep`` replaces the wait before a retry (tests pass a recorder) and ``rng`` the
    source of the jitter. Safe to use from several threads: the limit of ``max_concurrency``
    requests in flight holds across all of them.

    Backoff (Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015, "full
    jitter"): before retry ``k`` (``k = 0, 1, ...``) the client waits a uniform random time in
    ``[0, min(backoff_max_s, backoff_initial_s * 2**k)]``. When the server sends ``Retry-After``
    (seconds or an HTTP date; or ``retry-after-ms``) it waits exactly that long instead, capped at
    ``backoff_max_s`` so that no single wait exceeds the configured bound.
    """

    def __init__(
        self,
        spec: EndpointSpec,
        *,
        log: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(spec, EndpointSpec):
            raise TypeError(f"TeacherClient needs an EndpointSpec, got {type(spec).__name__}")
        self.spec = spec.model_copy(deep=True)
        self._key = _read_key(self.spec.api_key_env)
        self._log = log
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.spec.max_concurrency)
        self._stats = ClientStats()
        self._model = self.spec.model
        self._cache = ResponseCache(self.spec.cache_dir, log=self._say) if self.spec.cache_dir is not None else None
        self._opener = urllib.request.build_opener(_NoRedirects())

    @classmethod
    def from_url(
        cls,
        base_url: str,
        *,
        log: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
        **fields: Any,
    ) -> TeacherClient:
        """A client of ``base_url``; ``fields`` are the other :class:`EndpointSpec` fields."""
        return cls(EndpointSpec(base_url=base_url, **fields), log=log, sleep=sleep, rng=rng)

    def __repr__(self) -> str:
        key = f"${self.spec.api_key_env}" if self.spec.api_key_env else None
        return (
            f"TeacherClient(base_url={self.spec.base_url!r}, model={self._model!r}, key={key!r}, "
            f"max_concurrency={self.spec.max_concurrency}, cache_dir={self._cache.folder if self._cache else None!r})"
        )

    @property
    def stats(self) -> ClientStats:
        """A snapshot of the counters (see :class:`ClientStats`)."""
        with self._lock:
            return replace(self._stats)

    # ----------------------------------------------------------------------------- requests

    def models(self) -> list[str]:
        """Names of the models the endpoint serves (``GET /models``), in its order."""
        payload = self._send("GET", "/models", None, None)
        data = payload.get("data")
        if not isinstance(data, list):
            raise TeacherAPIError(200, "the answer has no 'data' list of models", self._url("/models"))
        return [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]

    def model_name(self) -> str:
        """The model requests go to: ``spec.model``, else the first of :meth:`models` (asked once)."""
        with self._model_lock:
            if self._model is None:
                names = self.models()
                if not names:
                    raise TeacherAPIError(200, "the endpoint lists no models; set 'model'", self._url("/models"))
                self._model = names[0]
                self._say(f"teacher model: {self._model} (the first of {len(names)} listed by {self._url('/models')})")
            return self._model

    def complete(
        self,
        prompt: str | list[int],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        stop: str | list[str] | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        seed: int | None = None,
        cache: bool = True,
        cache_salt: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``POST /completions``: the parsed response.

        ``prompt`` is a text or a list of token ids. ``logprobs=k`` asks for the log-probabilities
        of the sampled tokens and of the ``k`` most likely ones at each step (``echo=True`` also
        returns the prompt's tokens first). ``extra`` goes into the request body as given
        (``presence_penalty``, ``logit_bias``, ``model`` to override the client's model, ...).
        ``cache=False`` bypasses the response cache for this request (neither read nor written);
        ``cache_salt`` is mixed into its cache key (and not sent), to draw fresh samples of a
        request that is already cached.
        """
        job = self._completion_job(
            prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
            logprobs=logprobs, echo=echo, seed=seed, cache=cache, cache_salt=cache_salt, **extra,
        )  # fmt: skip
        return self._run(job, None)

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        stop: str | list[str] | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        seed: int | None = None,
        cache: bool = True,
        cache_salt: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``POST /chat/completions``: the parsed response.

        ``messages`` are ``{"role": ..., "content": ...}`` dicts. ``logprobs=True`` asks for the
        sampled tokens' log-probabilities, ``top_logprobs=k`` (which needs ``logprobs=True``) for
        the ``k`` most likely tokens at each step. ``extra``, ``cache`` and ``cache_salt`` are as
        in :meth:`complete`.
        """
        job = self._chat_job(
            messages, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
            logprobs=logprobs, top_logprobs=top_logprobs, seed=seed, cache=cache, cache_salt=cache_salt, **extra,
        )  # fmt: skip
        return self._run(job, None)

    def map(
        self,
        method: str,
        requests: Sequence[dict[str, Any]],
        *,
        progress: Callable[[int, int], None] | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run many ``method`` (``"complete"`` or ``"chat"``) requests concurrently; results in input order.

        Each request is a dict of the method's keyword arguments (``{"prompt": ..., "max_tokens":
        8}``). Every request is checked before any is sent. At most ``max_concurrency`` are in
        flight. With a cache, identical requests are sent once and share the response (so a rerun,
        which reads them from the cache, returns exactly what the first run did); each gets its
        own copy. ``progress(done, total)`` is called from the calling thread after each request.

        A request that fails for good raises :class:`TeacherAPIError` naming its index; the
        requests not yet started are dropped and those in flight are let finish (their responses
        reach the cache). With ``return_exceptions=True`` the error takes the request's place in
        the result instead and the others carry on.
        """
        builders: dict[str, Callable[..., _Job]] = {"complete": self._completion_job, "chat": self._chat_job}
        if method not in builders:
            raise ValueError(f"map: method must be 'complete' or 'chat', got {method!r}")
        required = "prompt" if method == "complete" else "messages"
        jobs: list[_Job] = []
        for index, request in enumerate(requests):
            if not isinstance(request, dict):
                raise TypeError(
                    f"request {index}: expected a dict of {method}() arguments, got {type(request).__name__}"
                )
            if required not in request:
                raise TypeError(f"request {index}: {method}() needs {required!r}")
            try:
                jobs.append(builders[method](**request))
            except (TypeError, ValueError) as error:
                raise type(error)(f"request {index}: {error}") from None

        total = len(jobs)
        followers: dict[int, list[int]] = {}
        leaders: dict[str, int] = {}
        unique: list[int] = []
        for index, job in enumerate(jobs):
            if job.cache and self._cache is not None:
                key = cache_key(job.path, job.body, job.salt)
                if key in leaders:
                    followers.setdefault(leaders[key], []).append(index)
                    continue
                leaders[key] = index
            unique.append(index)

        results: list[Any] = [None] * total
        if not unique:
            return results
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.spec.max_concurrency, len(unique)), thread_name_prefix="teacher")
        futures = {pool.submit(self._run, jobs[index], cancel): index for index in unique}
        done = 0
        try:
            for future in as_completed(futures):
                index = futures[future]
                try:
                    outcome: Any = future.result()
                except TeacherAPIError as error:
                    if not return_exceptions:
                        raise error.for_request(index) from None
                    outcome = error
                except Exception as error:
                    if not return_exceptions:
                        raise
                    outcome = error
                for position in (index, *followers.get(index, ())):
                    if isinstance(outcome, TeacherAPIError):
                        results[position] = outcome.for_request(position)
                    elif isinstance(outcome, BaseException) or position == index:
                        results[position] = outcome
                    else:
                        results[position] = copy.deepcopy(outcome)
                        self._count(cache_hits=1)
                    done += 1
                    if progress is not None:
                        progress(done, total)
        except TeacherAPIError:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        except BaseException:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results

    # ----------------------------------------------------------------------------- request bodies

    def _completion_job(self, prompt: str | list[int], **arguments: Any) -> _Job:
        """The checked request of ``complete(prompt, **arguments)``, not sent."""
        given = _call_arguments(self.complete, prompt, arguments)
        if isinstance(prompt, str):
            sent: str | list[int] = prompt
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(token, numbers.Integral) and not isinstance(token, bool) for token in prompt
        ):
            sent = [int(token) for token in prompt]
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        logprobs = given["logprobs"]
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            raise ValueError(f"logprobs must be a number of top tokens (an int >= 0) for complete(), got {logprobs!r}")
        body = self._common_body(given)
        body["prompt"] = sent
        if logprobs is not None:
            body["logprobs"] = logprobs
        if given["echo"]:
            body["echo"] = True
        return self._job("/completions", body, given)

    def _chat_job(self, messages: list[dict[str, Any]], **arguments: Any) -> _Job:
        """The checked request of ``chat(messages, **arguments)``, not sent."""
        given = _call_arguments(self.chat, messages, arguments)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for position, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise TypeError(f"messages[{position}] must be a dict with a 'role' string")
        logprobs, top_logprobs = given["logprobs"], given["top_logprobs"]
        if not isinstance(logprobs, bool):
            raise TypeError(f"logprobs is True or False for chat(), got {logprobs!r}; top_logprobs=k asks for k tokens")
        if top_logprobs is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        body = self._common_body(given)
        body["messages"] = [dict(message) for message in messages]
        if logprobs:
            body["logprobs"] = True
        if top_logprobs is not None:
            body["top_logprobs"] = int(top_logprobs)
        return self._job("/chat/completions", body, given)

    @staticmethod
    def _common_body(given: dict[str, Any]) -> dict[str, Any]:
        """The body fields that ``complete`` and ``chat`` share, from their arguments by name."""
        n, max_tokens, stop, seed = given["n"], given["max_tokens"], given["stop"], given["seed"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        # floats, so that temperature=1 and temperature=1.0 are one request (and one cache entry)
        body: dict[str, Any] = {
            "n": n, "temperature": float(given["temperature"]), "top_p": float(given["top_p"]), "max_tokens": max_tokens
        }  # fmt: skip
        if stop is not None:
            body["stop"] = stop if isinstance(stop, str) else [str(item) for item in stop]
        if seed is not None:
            body["seed"] = int(seed)
        return body

    def _job(self, path: str, body: dict[str, Any], given: dict[str, Any]) -> _Job:
        extra, cache, salt = given["extra"], given["cache"], given["cache_salt"]
        if extra.get("stream"):
            raise ValueError("stream=True is not supported: responses are read whole")
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"cache_salt must be a string, got {type(salt).__name__}")
        body = {**body, **extra}
        if body.get("model") is None:
            body["model"] = self.model_name()
        try:
            json.dumps(body, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the request body is not JSON: {error}") from None
        return _Job(path=path, body=body, cache=bool(cache), salt=salt)

    # ----------------------------------------------------------------------------- transport

    def _run(self, job: _Job, cancel: threading.Event | None) -> dict[str, Any]:
        cache = self._cache if job.cache else None
        if cache is not None:
            hit = cache.get(job.path, job.body, job.salt)
            if hit is not None:
                self._count(cache_hits=1)
                return hit
        response = self._send("POST", job.path, job.body, cancel)
        if not isinstance(response.get("choices"), list):
            self._count(failures=1)
            raise TeacherAPIError(200, "the answer has no 'choices' list", self._url(job.path))
        usage = response.get("usage")
        if isinstance(usage, dict):
            tokens = {
                name: int(usage[name])
                for name in ("prompt_tokens", "completion_tokens", "total_tokens")
                if isinstance(usage.get(name), (int, float))
            }
            self._count(**tokens)
        if cache is not None:
            try:
                cache.put(job.path, job.body, response, job.salt)
            except OSError as error:
                self._say(f"response cache: could not store a response under {cache.folder}: {error}")
        return response

    def _send(
        self, verb: str, path: str, body: dict[str, Any] | None, cancel: threading.Event | None
    ) -> dict[str, Any]:
        """One request with retries: the parsed JSON object, or :class:`TeacherAPIError`."""
        url = self._url(path)
        data = None if body is None else json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        attempts = self.spec.max_retries + 1
        for attempt in range(1, attempts + 1):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            try:
                with self._slots:
                    self._count(requests=1)
                    return self._attempt(verb, url, data)
            except _Transient as problem:
                if attempt == attempts:
                    self._count(failures=1)
                    raise TeacherAPIError(problem.status, problem.message, url, attempts=attempt) from None
                if problem.retry_after is not None:
                    delay = min(problem.retry_after, self.spec.backoff_max_s)
                else:
                    with self._lock:
                        cap = min(self.spec.backoff_max_s, self.spec.backoff_initial_s * 2.0 ** min(attempt - 1, 64))
                        delay = self._rng.uniform(0.0, cap)
                answer = f"HTTP {problem.status}" if problem.status is not None else "no answer"
                self._say(
                    f"{verb} {url}: {answer} ({problem.message}); "
                    f"retry {attempt} of {self.spec.max_retries} in {delay:.2f} s"
                )
                self._count(retries=1, backoff_s=delay)
                self._wait(delay, cancel)
            except TeacherAPIError:
                self._count(failures=1)
                raise
        raise AssertionError("unreachable")

    def _attempt(self, verb: str, url: str, data: bytes | None) -> dict[str, Any]:
        request = urllib.request.Request(url, data=data, method=verb)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        request.add_header("User-Agent", f"distill/{__version__}")
        for name, value in self.spec.extra_headers.items():
            request.add_header(name, value)
        if self._key is not None:
            request.add_header("Authorization", "Bearer " + self._key.reveal())
        try:
            with self._opener.open(request, timeout=self.spec.timeout_s) as response:
                status = int(response.status)
                raw = response.read()
        except urllib.error.HTTPError as error:
            raise self._http_error(error, url) from None
        except urllib.error.URLError as error:
            raise self._connection_error(error.reason, url) from None
        except (http.client.HTTPException, OSError) as error:
            raise self._connection_error(error, url) from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Transient(status, f"the answer is not JSON: {self._redact(_clip(raw))!r}") from None
        if not isinstance(payload, dict):
            raise _Transient(status, f"the answer is JSON but not an object: {self._redact(_clip(raw))!r}")
        return payload

    def _http_error(self, error: urllib.error.HTTPError, url: str) -> Exception:
        try:
            raw = error.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            error.close()
        status = int(error.code)
        message = self._redact(_error_message(raw, str(error.reason or "")))
        if status in _RETRIED_4XX or status >= 500:
            return _Transient(status, message, _retry_after(error.headers))
        if 300 <= status < 400:
            location = urllib.parse.urlsplit(error.headers.get("Location", "") or "")._replace(query="", fragment="")
            message = (
                f"redirected to {location.geturl() or 'an unnamed location'}; set base_url to the final address "
                "(redirects are not followed, so the key never travels elsewhere)"
            )
        elif status in (401, 403):
            hint = (
                f"check the key in ${self.spec.api_key_env}"
                if self.spec.api_key_env
                else "no API key is configured: set api_key_env to the variable that holds it"
            )
            message = f"{message} ({hint})"
        elif status == 404:
            message = f"{message} (check base_url, which usually ends in /v1, and the model name)"
        return TeacherAPIError(status, message, url)

    def _connection_error(self, reason: Any, url: str) -> Exception:
        text = self._redact(str(reason) or type(reason).__name__)
        if isinstance(reason, ssl.SSLError):
            return TeacherAPIError(None, f"TLS failure: {text}", url)
        if isinstance(reason, TimeoutError):
            return _Transient(None, f"timed out after {self.spec.timeout_s:g} s")
        return _Transient(None, f"{type(reason).__name__}: {text}")

    # ----------------------------------------------------------------------------- plumbing

    def _url(self, path: str) -> str:
        return self.spec.base_url + path

    def _redact(self, text: str) -> str:
        if self._key is not None:
            text = text.replace(self._key.reveal(), "<redacted>")
        return text

    def _say(self, message: str) -> None:
        if self._log is not None:
            self._log(self._redact(message))

    def _wait(self, delay: float, cancel: threading.Event | None) -> None:
        if self._sleep is not None:
            self._sleep(delay)
        elif cancel is not None:
            cancel.wait(delay)
        else:
            time.sleep(delay)

    def _count(self, **increments: float) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)


def _clip(raw: bytes | str, limit: int = _MESSAGE_LIMIT) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _error_message(raw: bytes, fallback: str) -> str:
    """The server's error message: OpenAI's ``{"error": {"message": ...}}`` and the usual variants."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text) if text else None
    except json.JSONDecodeError:
        payload = None
    candidates: list[Any] = []
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            candidates += [error.get("message"), error.get("detail")]
        candidates += [error, payload.get("message"), payload.get("detail")]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return _clip(candidate)
        if isinstance(candidate, list) and candidate:
            return _clip(json.dumps(candidate))
    return _clip(text) or fallback or "no message"


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); ``None`` if absent."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# --------------------------------------------------------------------------------- response helpers


def _choices(response: dict[str, Any]) -> list[dict[str, Any]]:
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list):
        raise TypeError("not a completion or chat response: it has no 'choices' list")
    order = sorted(range(len(choices)), key=lambda position: (_index(choices[position], position), position))
    return [choices[position] for position in order]


def _index(choice: Any, position: int) -> int:
    index = choice.get("index") if isinstance(choice, dict) else None
    return index if isinstance(index, int) else position


def choice_texts(response: dict[str, Any]) -> list[str]:
    """The generated text of every choice, by ``index``: ``text`` (completions) or ``message.content`` (chat).

    A chat message without content (a refusal or a tool call) gives ``""``; content given as a list
    of parts gives the concatenation of its text parts.
    """
    texts: list[str] = []
    for position, choice in enumerate(_choices(response)):
        if "text" in choice:
            texts.append(choice["text"] or "")
        elif isinstance(choice.get("message"), dict):
            content = choice["message"].get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            texts.append(content or "")
        else:
            raise ValueError(f"choice {position} has neither 'text' (completions) nor 'message' (chat)")
    return texts


def finish_reasons(response: dict[str, Any]) -> list[str | None]:
    """Why each choice stopped (``"stop"``, ``"length"``, ...), by ``index``; ``None`` where not given."""
    return [choice.get("finish_reason") for choice in _choices(response)]


def choice_logprobs(response: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Per choice, per token: ``{"token": str, "logprob": float | None, "top_logprobs": {token: logprob}}``.

    Reads both shapes: completions (``logprobs.tokens``, ``token_logprobs``, ``top_logprobs``) and
    chat (``logprobs.content[i]`` with a ``top_logprobs`` list). With ``echo=True`` a completion's
    list starts with the prompt's tokens, the first of which has ``logprob`` ``None``. Where several
    alternatives decode to the same string the first listed is kept (the completions API's dict
    already merges them). A choice without log-probabilities is an error that says how to ask.
    """
    result: list[list[dict[str, Any]]] = []
    for position, choice in enumerate(_choices(response)):
        block = choice.get("logprobs")
        if block is None:
            raise ValueError(
                f"choice {position} carries no logprobs: ask with complete(..., logprobs=k) "
                "or chat(..., logprobs=True, top_logprobs=k)"
            )
        if not isinstance(block, dict):
            raise TypeError(f"choice {position}: logprobs is a {type(block).__name__}, not an object")
        if "content" in block:
            tokens = []
            for entry in block.get("content") or []:
                top: dict[str, float] = {}
                for alternative in entry.get("top_logprobs") or []:
                    top.setdefault(alternative["token"], float(alternative["logprob"]))
                tokens.append({"token": entry["token"], "logprob": _float(entry.get("logprob")), "top_logprobs": top})
        elif "tokens" in block:
            names = list(block.get("tokens") or [])
            values = list(block.get("token_logprobs") or [None] * len(names))
            tops = list(block.get("top_logprobs") or [None] * len(names))
            if not len(names) == len(values) == len(tops):
                raise ValueError(
                    f"choice {position}: {len(names)} tokens, {len(values)} token_logprobs, {len(tops)} top_logprobs"
                )
            tokens = [
                {
                    "token": name,
                    "logprob": _float(value),
                    "top_logprobs": {str(key): float(item) for key, item in (top or {}).items()},
                }
                for name, value, top in zip(names, values, tops)
            ]
        else:
            raise ValueError(f"choice {position}: logprobs of an unknown shape (keys {sorted(block)})")
        result.append(tokens)
    return result


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
