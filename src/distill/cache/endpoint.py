"""Offline teacher caches from a black-box endpoint: the top-k log-probabilities an API returns.

:func:`build_endpoint_cache` writes the same cache as :func:`distill.cache.teacher.build_teacher_caches`
(same kind, meta fields, records and shards; resumable and checksummed; read by ``sparse_kd`` through
``teacher: {cache: PATH}``), but the teacher is a model behind an OpenAI-compatible HTTP API
(``distill serve``, vLLM) that returns the log-probabilities of a prompt's tokens. For every training
row with target tokens it sends one ``POST /completions``::

    {"prompt": [ids of the row up to its last target, then that target],
     "echo": true, "max_tokens": 0, "logprobs": k, "temperature": 0.0,
     "return_tokens_as_token_ids": true}

and reads the prompt's ``top_logprobs``. OpenAI's echo convention: entry ``i`` of the echoed prompt
belongs to prompt token ``i`` and holds the distribution that *predicts* it, from tokens ``0..i-1``;
entry 0 is ``null`` (nothing predicts the first token). A target at position ``t`` (``labels[t]``,
the token after ``input_ids[t]``) is predicted from tokens ``0..t``, so its top-k is entry ``t + 1``.
The prompt ends with the last target itself, so that the last distribution is reported too.

References and choices:

* G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep
  Learning Workshop 2015: the teacher's next-token distribution is the target; here it is known on
  its top k only, like the top-k caches of arcee-ai's DistillKit, which ``sparse_kd`` trains from.
* The request is OpenAI's legacy Completions API (``echo``, ``logprobs``; OpenAI API reference).
  ``return_tokens_as_token_ids`` is vLLM's extension (W. Kwon et al., "Efficient Memory Management
  for Large Language Model Serving with PagedAttention", SOSP 2023), which names tokens
  ``token_id:123``: a token's text is ambiguous (several ids may decode alike), its id is not.
* Servers add the prompt token itself to its ``top_logprobs`` entry when it is not among the top k
  (OpenAI's convention), so an entry holds k or k + 1 tokens: the k largest are kept. An entry with
  fewer than k is an error: a server capping ``logprobs`` below k would otherwise give a cache whose
  tail silently holds the missing tokens.
* The mass outside the top k is ``1 - sum(exp(top-k))``, computed in float64 from the values the
  endpoint reports (its log-softmax, normalized over its whole output layer). Those values are float32
  at best, so a tail below ``k * 2**-23`` (the resolution of their sum) is clamped up to it; with k
  equal to the vocabulary the tail is ``-inf``, as in a local cache.
* ``temperature`` 0 makes the request deterministic (no sampling happens with ``max_tokens`` 0 anyway),
  which is what the client's response cache assumes when it answers a rerun without asking again.
* Before any row is sent, a probe checks the endpoint: it must tokenize a probe text and a training
  row's decoded text into the ids the data's tokenizer gives (the rows are sent as ids, which mean
  other tokens to another tokenizer), report tokens as ids, follow the echo convention, and return at
  least k most likely tokens per position. A weight hash cannot be computed over HTTP: the manifest
  names the endpoint (``{"endpoint": model name, "base_url": ...}``, no key) and stores
  ``teacher_weights_sha256: null``, and a stage reading the cache cannot name ``model``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.blackbox.client import EndpointSpec, TeacherAPIError, TeacherClient, choice_logprobs
from distill.cache import topk
from distill.cache.store import MANIFEST, ShardedWriter
from distill.cache.teacher import KIND, cache_meta, cache_stats
from distill.data.base import IGNORE_INDEX

__all__ = [
    "DEFAULT_K",
    "EndpointCacheError",
    "build_endpoint_cache",
    "check_endpoint",
    "command_cache_endpoint",
    "endpoint_identity",
    "row_prompt",
    "row_request",
    "row_top_k",
    "tail_logmass",
]

DEFAULT_K = 20
"""The default k: the most OpenAI's API and vLLM return per position unless configured otherwise."""

TOKEN_ID_PREFIX = "token_id:"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 ¿Qué? naïve café, Größe; 東京 🙂\n\tdef f(x): return x**2"
"""A probe with words, digits, accents, CJK, an emoji, whitespace and code: tokenizers that differ split it differently."""

_TAIL_RESOLUTION = 2.0**-23
_LOGPROB_SLACK = 1e-4


class EndpointCacheError(ValueError):
    """An endpoint that cannot give a teacher cache: another tokenizer, too few logprobs, another convention."""


def endpoint_identity(client: TeacherClient) -> dict[str, Any]:
    """What names an endpoint teacher in a manifest: the model name and the base URL (which holds no secret)."""
    return {"endpoint": client.model_name(), "base_url": client.spec.base_url}


def row_prompt(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], np.ndarray]:
    """The prompt of one training row and its target positions.

    The prompt is the row's token ids up to its last target position ``t_last``, followed by that
    target (``labels[t_last]``), so that the echo reports the distribution at every target
    position, the last included. ``([], [])`` for a row without targets.
    """
    positions = torch.nonzero(labels != IGNORE_INDEX).flatten()
    if not len(positions):
        return [], np.zeros(0, dtype=np.int64)
    last = int(positions[-1])
    prompt = [int(token) for token in inputs[: last + 1].tolist()] + [int(labels[last])]
    return prompt, positions.numpy().astype(np.int64)


def row_request(prompt: list[int] | str, k: int, *, cache: bool = True) -> dict[str, Any]:
    """The keyword arguments of :meth:`TeacherClient.complete` that ask for the prompt's top-k logprobs."""
    return {
        "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": int(k), "temperature": 0.0,
        "return_tokens_as_token_ids": True, "cache": cache,
    }  # fmt: skip


def _token_id(name: str, where: str) -> int:
    if not isinstance(name, str) or not name.startswith(TOKEN_ID_PREFIX):
        raise EndpointCacheError(
            f"{where}: the endpoint reports the token {name!r}, not 'token_id:<id>': it ignores "
            "return_tokens_as_token_ids, so its tokens cannot be matched to the data's ids unambiguously; "
            "a cache needs a server that supports it (distill serve, vLLM)"
        )
    try:
        return int(name[len(TOKEN_ID_PREFIX):])
    except ValueError:
        raise EndpointCacheError(f"{where}: the endpoint reports the malformed token {name!r}") from None


def _echoed(response: dict[str, Any], prompt_length: int | None, where: str) -> list[dict[str, Any]]:
    """The echoed prompt's entries (all of them when ``prompt_length`` is None), checked for OpenAI's
    convention: one per prompt token, the first null."""
    try:
        entries = choice_logprobs(response)[0]
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise EndpointCacheError(f"{where}: the endpoint's answer has no usable logprobs ({error})") from None
    if not entries or (prompt_length is not None and len(entries) < prompt_length):
        raise EndpointCacheError(
            f"{where}: the endpoint echoed {len(entries)} tokens of a {prompt_length or 'non-empty'}"
            f"{'-token' if prompt_length else ''} prompt; it does not "
            "return the prompt's logprobs with echo=true and max_tokens=0"
        )
    if entries[0]["logprob"] is not None or entries[0]["top_logprobs"]:
        raise EndpointCacheError(
            f"{where}: the endpoint reports a log-probability for the first prompt token, which nothing predicts; "
            "it does not follow OpenAI's echo convention (null first), so its positions cannot be aligned safely"
        )
    return entries if prompt_length is None else entries[:prompt_length]


def row_top_k(
    response: dict[str, Any], prompt: list[int], positions: np.ndarray, k: int, vocab: int, where: str = "the response"
) -> tuple[np.ndarray, np.ndarray]:
    """``(logprobs [M, k] float64, ids [M, k] int64)`` at the target ``positions`` of one row's response.

    Position ``t`` reads the echoed entry ``t + 1`` (the distribution that predicts prompt token
    ``t + 1`` from tokens ``0..t``); of its ``k`` or ``k + 1`` tokens the ``k`` most likely are kept,
    most likely first (ties: lower id first).
    """
    entries = _echoed(response, len(prompt), where)
    echoed = [_token_id(entry["token"], where) for entry in entries]
    if echoed != prompt:
        first = next(i for i, (a, b) in enumerate(zip(echoed, prompt)) if a != b)
        raise EndpointCacheError(
            f"{where}: the endpoint echoed token {echoed[first]} at prompt position {first} where {prompt[first]} was "
            "sent; it changed the token-id prompt (added or replaced tokens), so its logprobs are not the row's"
        )
    values = np.empty((len(positions), k), dtype=np.float64)
    ids = np.empty((len(positions), k), dtype=np.int64)
    for row, position in enumerate(positions.tolist()):
        top = entries[position + 1]["top_logprobs"]
        if len(top) < k:
            raise EndpointCacheError(
                f"{where}: the endpoint returned {len(top)} most likely tokens at position {position + 1}, fewer than "
                f"k={k}; lower k or raise the server's limit (distill serve --max-logprobs, vLLM --max-logprobs)"
            )
        ranked = sorted(((float(value), _token_id(name, where)) for name, value in top.items()), key=lambda e: (-e[0], e[1]))[:k]
        values[row] = [value for value, _ in ranked]
        ids[row] = [token for _, token in ranked]
    if len(positions):
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise EndpointCacheError(
                f"{where}: the endpoint ranks token id {bad} among the most likely, outside the data's vocabulary "
                f"0..{vocab - 1}; its model's vocabulary is not the data tokenizer's"
            )
        if not np.isfinite(values).all() or values.max() > _LOGPROB_SLACK:
            raise EndpointCacheError(f"{where}: the endpoint returned logprobs that are not finite log-probabilities (<= 0)")
        mass = np.exp(values).sum(axis=1).max()
        if mass > 1.0 + 1e-3:
            raise EndpointCacheError(
                f"{where}: the endpoint's top-{k} probabilities add up to {mass:.4f} > 1; they are not a normalized "
                "distribution's log-probabilities"
            )
    return np.minimum(values, 0.0), ids


def tail_logmass(values: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """``log(1 - sum(exp(values)))`` per row of ``[M, k]`` top-k log-probabilities, clamped below at
    ``log(k * 2**-23)`` (the resolution of a sum of k float32 probabilities); ``-inf`` when k = vocab."""
    if k >= vocab:
        return np.full(len(values), -np.inf)
    rest = 1.0 - np.exp(values).sum(axis=1)
    return np.log(np.maximum(rest, k * _TAIL_RESOLUTION))


def _as_client(endpoint: EndpointSpec | TeacherClient, log: Callable[[str], None] | None) -> TeacherClient:
    if isinstance(endpoint, TeacherClient):
        return endpoint
    if isinstance(endpoint, EndpointSpec):
        return TeacherClient(endpoint, log=log)
    raise TypeError(f"endpoint must be an EndpointSpec or a TeacherClient, got {type(endpoint).__name__}")


def _data_tokenizer(data: Any) -> Any:
    from distill.models.causal_lm import load_tokenizer

    source = data.meta.get("tokenizer")
    if not isinstance(source, str) or not source:
        raise EndpointCacheError(
            f"the data set '{data.name}' names no tokenizer (meta 'tokenizer'), so the endpoint's tokenizer cannot be "
            "checked against it"
        )
    return load_tokenizer(source)


def _endpoint_failure(error: TeacherAPIError, what: str) -> TeacherAPIError:
    return TeacherAPIError(error.status, f"{what}: {error.message}", error.url, attempts=error.attempts)


def check_endpoint(client: TeacherClient, data: Any, k: int, *, tokenizer: Any = None) -> None:
    """Refuse an endpoint whose tokens are not the data's, or that cannot give k logprobs per position.

    Sends :data:`PROBE_TEXT` and the decoded text of the first training row with targets as text
    prompts (``echo``, ``max_tokens`` 0, ``logprobs`` k, token ids), bypassing the response cache
    (the live server is what is checked), and compares the token ids the endpoint reports with the
    data tokenizer's encoding of the same texts (special tokens added on both sides, as servers do).
    """
    tokenizer = tokenizer if tokenizer is not None else _data_tokenizer(data)
    texts = [PROBE_TEXT]
    targets = (data.train.labels != IGNORE_INDEX).any(dim=1).nonzero().flatten()
    if len(targets):
        prompt, _ = row_prompt(data.train.inputs[int(targets[0])], data.train.labels[int(targets[0])])
        texts.append(tokenizer.decode(prompt[:64], skip_special_tokens=False))
    try:
        responses = client.map("complete", [row_request(text, k, cache=False) for text in texts])
    except TeacherAPIError as error:
        hint = ""
        if error.status == 400 and "logprobs" in error.message:
            hint = f" (the server refuses logprobs={k}: lower k or raise its limit, e.g. distill serve --max-logprobs {k})"
        raise _endpoint_failure(error, f"the probe of the endpoint's tokenizer and logprobs failed{hint}") from None
    source = data.meta.get("tokenizer")
    for number, (text, response) in enumerate(zip(texts, responses)):
        where = "the probe" if number == 0 else "the probe with the first training row's text"
        expected = [int(token) for token in tokenizer(text, add_special_tokens=True)["input_ids"]]
        entries = _echoed(response, None, where)
        got = [_token_id(entry["token"], where) for entry in entries]
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise EndpointCacheError(
                f"the endpoint '{client.model_name()}' at {client.spec.base_url} does not use the data's tokenizer "
                f"('{source}'): {where} ({_clip(text)!r}) is {len(got)} tokens {_clip(got)} for the endpoint and "
                f"{len(expected)} tokens {_clip(expected)} for the data's tokenizer, first different at token {first}. "
                "The training rows are sent as token ids, which would mean other tokens to this model; serve a model "
                "with the data's tokenizer, or tokenize the data with the served model's (data.params.tokenizer)"
            )
        short = [len(entry["top_logprobs"]) for entry in entries[1:] if len(entry["top_logprobs"]) < k]
        if short:
            raise EndpointCacheError(
                f"the endpoint '{client.model_name()}' returned {min(short)} most likely tokens per position, fewer than "
                f"k={k}; lower k or raise the server's limit (distill serve --max-logprobs, vLLM --max-logprobs)"
            )


def _clip(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finished(path: Path) -> bool:
    """Whether ``path`` holds a store its manifest calls complete (then no probe is needed: nothing is asked)."""
    try:
        return bool(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def build_endpoint_cache(
    experiment: Any,
    path: str | Path,
    *,
    endpoint: EndpointSpec | TeacherClient,
    k: int = DEFAULT_K,
    value_bits: int = 8,
    shard_rows: int = 256,
    data: Any = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or finish) the top-k cache of an endpoint teacher over the training split; returns the manifest.

    ``endpoint`` is an :class:`EndpointSpec` or a ready :class:`TeacherClient` (its concurrency,
    retries and response cache are used: with ``cache_dir``, a rerun sends no row it already sent;
    the store itself resumes shard by shard, so a run killed partway and started again with the same
    arguments asks only for the rows of the shards still missing). ``data`` is the loaded data
    (default: loaded from ``experiment.data``). Raises :class:`EndpointCacheError` for an endpoint
    that cannot give the cache, :class:`~distill.blackbox.TeacherAPIError` (naming the training row)
    for a request that failed for good, and :class:`~distill.cache.store.StoreError` for a folder
    holding a cache made with other settings.
    """
    from distill.data import load_data
    from distill.models.causal_lm import tokenizer_hash

    data = data if data is not None else load_data(experiment.data)
    if not data.is_lm or data.train.inputs.dim() != 2:
        raise ValueError(f"a teacher cache needs language-model data of single sequences [N, T]; '{data.name}' is not")
    vocab = int(data.num_classes)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k must lie in 1..{vocab} (the vocabulary), got {k!r}")
    width = topk.record_bytes(k, vocab, value_bits)  # also checks value_bits
    client = _as_client(endpoint, log)
    before = client.stats
    try:
        identity = endpoint_identity(client)
    except TeacherAPIError as error:
        raise _endpoint_failure(error, "asking the endpoint for its model name") from None
    tokenizer = _data_tokenizer(data)
    if data.meta.get("tokenizer_hash") is not None and tokenizer_hash(tokenizer) != data.meta["tokenizer_hash"]:
        raise EndpointCacheError(
            f"the tokenizer '{data.meta.get('tokenizer')}' loads differently from the one the data was tokenized with "
            "(its hash changed); load the data again"
        )
    meta = cache_meta(data, identity, None, k, value_bits)
    if not _finished(Path(path)):  # probe first, so that a refused endpoint leaves no folder behind
        check_endpoint(client, data, k, tokenizer=tokenizer)
    writer = ShardedWriter(path, KIND, meta, num_rows=len(data.train), shard_rows=shard_rows, record_bytes=width)
    pending = writer.pending()
    total = len(data.train)
    done = total - sum(end - start for _, start, end in pending)
    if log is not None and done and pending:
        log(f"{done} of {total} rows already cached; asking the endpoint for the other {total - done}")
    if progress is not None:
        progress(done, total)
    started = time.perf_counter()
    for index, start, end in pending:
        prompts = [row_prompt(data.train.inputs[row], data.train.labels[row]) for row in range(start, end)]
        asked = [row for row in range(start, end) if prompts[row - start][0]]
        base = done + (end - start - len(asked))

        def advance(finished: int, _: int, base: int = base) -> None:
            if progress is not None:
                progress(base + finished, total)

        try:
            responses = client.map("complete", [row_request(prompts[row - start][0], k) for row in asked], progress=advance)
        except TeacherAPIError as error:
            row = asked[error.index] if error.index is not None else None
            raise _endpoint_failure(error, f"training row {row}" if row is not None else "a training row") from None
        records: list[np.ndarray] = [np.zeros((0, width), dtype=np.uint8)] * (end - start)
        for row, response in zip(asked, responses):
            prompt, positions = prompts[row - start]
            values, ids = row_top_k(response, prompt, positions, k, vocab, where=f"training row {row}")
            tail = tail_logmass(values, k, vocab)
            records[row - start] = topk.encode(torch.from_numpy(values), torch.from_numpy(ids), torch.from_numpy(tail), vocab, value_bits)
        writer.write_shard(index, records)
        done += end - start
        if progress is not None:
            progress(done, total)
    after = client.stats
    return writer.finish(stats={
        **cache_stats(writer, width),
        "last_run_s": round(time.perf_counter() - started, 3),
        "last_run_requests": after.requests - before.requests,
        "last_run_cache_hits": after.cache_hits - before.cache_hits,
    })


def command_cache_endpoint(args: Any, console: Any) -> int:
    """``distill cache-teacher EXP.yaml --endpoint URL [--endpoint-model NAME] [--api-key-env ENV]``.

    Reads ``args.config``, ``args.overrides``, ``args.endpoint``, ``args.endpoint_model``,
    ``args.api_key_env``, ``args.out``, ``args.k``, ``args.value_bits``, ``args.shard_rows``,
    ``args.no_progress`` and, when the parser defines them, ``args.response_cache`` (the client's
    ``cache_dir``) and ``args.concurrency``. The experiment's ``cache:`` section gives ``path``,
    ``value_bits``, ``shard_rows`` and ``k`` when set there (else k = 20, the usual API limit).
    Returns the exit status.
    """
    from pydantic import ValidationError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from distill.config import ConfigError, load_experiment

    if getattr(args, "teacher", None):
        raise ConfigError(["--teacher names a model of `models`, --endpoint a served model: give one of them, not both"])
    experiment = load_experiment(args.config, getattr(args, "overrides", None) or ())
    section = experiment.cache
    out = args.out or (section.path if section else None)
    if out is None:
        raise ConfigError(["say where to write the cache: --out DIR, or a `cache: {path: DIR}` section"])
    fields: dict[str, Any] = {"base_url": args.endpoint, "model": args.endpoint_model, "api_key_env": args.api_key_env}
    if getattr(args, "response_cache", None):
        fields["cache_dir"] = args.response_cache
    if getattr(args, "concurrency", None):
        fields["max_concurrency"] = args.concurrency
    try:
        spec = EndpointSpec(**fields)
    except ValidationError as error:
        flags = {"base_url": "--endpoint", "model": "--endpoint-model", "api_key_env": "--api-key-env",
                 "cache_dir": "--response-cache", "max_concurrency": "--concurrency"}
        problems = [
            f"{flags.get(str(e['loc'][0]), e['loc'][0])}: {str(e['msg']).removeprefix('Value error, ')}" for e in error.errors()
        ]
        raise ConfigError(problems) from None
    k = args.k or (section.k if section is not None and "k" in section.model_fields_set else DEFAULT_K)
    value_bits = args.value_bits or (section.value_bits if section else 8)
    shard_rows = args.shard_rows or (section.shard_rows if section else 256)
    client = TeacherClient(spec, log=lambda line: console.print(line, markup=False, highlight=False))
    console.print(f"caching the top-{k} of the endpoint {spec.base_url} into {out}", markup=False, highlight=False)
    bar = Progress(
        TextColumn("[bold blue]endpoint cache"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=args.no_progress or not console.is_terminal,
    )
    task = bar.add_task("endpoint cache", total=None)
    try:
        with bar:
            manifest = build_endpoint_cache(
                experiment, out, endpoint=client, k=k, value_bits=value_bits, shard_rows=shard_rows,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                log=lambda line: console.print(line, markup=False, highlight=False),
            )
    except TeacherAPIError as error:
        raise ValueError(str(error)) from None
    stats = manifest["stats"]
    per_token = f"{stats['bytes_per_token']:.1f}" if stats["bytes_per_token"] is not None else "-"
    Console(width=max(Console().width, 140)).print(
        f"cache complete: {manifest['rows']:,} rows, {stats['tokens']:,} tokens, {len(manifest['shards'])} shards, "
        f"{stats['bytes'] / 1e6:.1f} MB ({per_token} bytes/token, records of {stats['record_bytes']} bytes); "
        f"{stats['last_run_requests']:,} requests, {stats['last_run_cache_hits']:,} answered from the response cache",
        markup=False, highlight=False,
    )
    return 0
