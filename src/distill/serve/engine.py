"""Batched decoding for ``distill serve``: left-padded prompts, one KV cache, per-row settings.

:func:`decode_batch` decodes a list of :class:`Row` objects together. Every row carries its own
:class:`SamplingParams` (temperature, top-p, token budget, stop strings, logprobs, seed), and rows
finish independently; the loop ends when every row has finished. :class:`BatchWorker` is the
thread that gathers queued rows from concurrent requests into such batches.

Choices made here:

* **Static batches** (a batch runs until its last row finishes; rows arriving meanwhile wait for
  the next one). Iteration-level scheduling, which admits new rows between decoding steps
  (Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative Models",
  OSDI 2022), needs a cache with per-row lengths; the Hugging Face caches have one length per
  batch, so finished rows are *removed* from the cache instead (when the cache supports
  ``batch_select_indices``), which keeps late steps as cheap as the rows still running.
* **Left padding with an attention mask** and position ids counted from each row's first real
  token, so a padded row sees exactly the positions it would see alone.
* **Per-row random generators.** A row draws one uniform number per sampled token from its own
  ``torch.Generator`` (seeded from the request's ``seed`` and the sample's index), and picks the
  token by inverting the cumulative distribution. Its samples therefore do not depend on which
  other rows share the batch.
* **Logprobs** are ``log_softmax`` of the raw logits in float32, at temperature 1 and before
  top-p: they describe the model, not the sampler.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    ``temperature`` 0 means greedy (argmax). ``top_p`` < 1 samples from the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling: Holtzman et al., "The
    Curious Case of Neural Text Degeneration", ICLR 2020); the most likely token is always in the
    set, so a tiny ``top_p`` is greedy. ``stop`` strings end the row (the text is cut before the
    first one). ``logprobs`` asks for the ``k`` most likely alternatives of every generated token
    (0: the chosen token's logprob only; None: no logprobs); ``prompt_logprobs`` the same for the
    prompt tokens. ``seed`` seeds the row's own generator.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    seed: int = 0


@dataclass
class Row:
    """One sequence to decode, and what decoding produced.

    ``tokens`` are the generated tokens, without the end-of-sequence token and without tokens
    after a stop string; ``generated`` counts every token the model produced (both included).
    ``logprobs[i]`` is the logprob of ``tokens[i]`` and ``top_logprobs[i]`` its ``k`` most likely
    alternatives as ``(token id, logprob)``, most likely first. ``prompt_logprobs`` has one entry
    per prompt token, None for the first (nothing predicts it). ``cut`` is True when a stop string
    ended the row.
    """

    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    owner: Any = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    generated: int = 0
    cut: bool = False


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class _Forward:
    """Calls the model with the keyword names its ``forward`` takes (read once per batch)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache_name = "cache" if _accepts(model, "cache") else "past_key_values"
        self.keeps_logits = _accepts(model, "logits_to_keep")

    def __call__(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any, keep_all_logits: bool
    ) -> Any:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
        if cache is not None:
            kwargs[self.cache_name] = cache
        if not keep_all_logits and self.keeps_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)


def _output_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` in recent ``transformers``, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _can_shrink(cache: Any) -> bool:
    """Whether finished rows can be dropped from ``cache`` (else they are carried to the end)."""
    return callable(getattr(cache, "batch_select_indices", None))


def _top(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` largest entries of each row of ``[N, V]`` as (id, value) pairs, largest first."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row from its float32 logits ``[V]``: argmax at temperature 0, otherwise
    a draw from the temperature-scaled distribution cut to the top-p nucleus (Holtzman et al.,
    ICLR 2020), by one uniform number from ``generator`` and the inverse cumulative distribution."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    order: torch.Tensor | None = None
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, descending=True, stable=True)
        before = probs.cumsum(-1) - probs
        probs = probs * (before < params.top_p)
    cumulative = probs.cumsum(-1)
    draw = float(torch.rand((), generator=generator)) * float(cumulative[-1])
    index = int(torch.searchsorted(cumulative, torch.tensor([draw], dtype=cumulative.dtype, device=cumulative.device), right=True))
    index = min(index, probs.shape[-1] - 1)
    return int(order[index]) if order is not None else index


def _find_stop(text: str, stops: Iterable[str]) -> int:
    """The position of the earliest stop string in ``text``, or -1."""
    found = [position for position in (text.find(stop) for stop in stops) if position >= 0]
    return min(found) if found else -1


def _cut_at_stop(row: Row, position: int, decode: Callable[[list[int]], str]) -> None:
    """End ``row`` at a stop string starting at character ``position``: the text stops before it and
    the token lists keep the shortest prefix whose text covers the kept text."""
    row.text = decode(row.tokens)[:position]
    keep = 0
    while keep < len(row.tokens) and len(decode(row.tokens[:keep])) < position:
        keep += 1
    del row.tokens[keep:], row.logprobs[keep:], row.top_logprobs[keep:]
    row.finish_reason = FINISH_STOP
    row.cut = True


def decode_batch(
    model: torch.nn.Module,
    rows: list[Row],
    *,
    eos_token_ids: Iterable[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    pad_token_id: int = 0,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    """Decode ``rows`` together with one KV cache; fills each row's outputs in place.

    ``cancelled`` (optional) is asked before every decoding step; when it answers True the batch
    ends at once with :class:`ShuttingDown` (a server stopping mid-batch).

    ``model`` is a Hugging Face causal LM (``forward`` takes ``input_ids``, ``attention_mask``,
    ``position_ids``, ``cache`` or ``past_key_values``, ``use_cache``). Prompts are left-padded; each row stops
    at an end-of-sequence token (``eos_token_ids``), a stop string (needs ``decode``, which turns
    token ids into text) or its token budget. Autoregressive decoding reuses the keys and values
    of earlier positions (Vaswani et al., "Attention Is All You Need", NeurIPS 2017), so each step
    runs the model on one new token per row.
    """
    if not rows:
        return
    if any(not row.prompt for row in rows):
        raise ValueError("decode_batch: every row needs at least one prompt token")
    if any(row.params.stop for row in rows) and decode is None:
        raise ValueError("decode_batch: stop strings need `decode` (token ids -> text)")
    eos = set(int(token) for token in eos_token_ids)
    with torch.inference_mode():
        _decode(model, rows, eos, decode, pad_token_id, cancelled)
    for row in rows:
        if not row.cut:
            row.text = decode(row.tokens) if decode is not None else ""


def _decode(
    model: torch.nn.Module, rows: list[Row], eos: set[int], decode: Any, pad_token_id: int, cancelled: Any = None
) -> None:
    device = model_device(model)
    forward = _Forward(model)
    width = max(len(row.prompt) for row in rows)
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row.prompt):] = torch.tensor(row.prompt, dtype=torch.long)
        mask[index, width - len(row.prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    keep_all = any(row.params.prompt_logprobs is not None for row in rows)
    output = forward(input_ids, mask, positions, None, keep_all)
    if keep_all:
        for index, row in enumerate(rows):
            if row.params.prompt_logprobs is not None:
                _fill_prompt_logprobs(row, output.logits[index, width - len(row.prompt): width - 1])
    next_logits = output.logits[:, -1, :]
    cache = _output_cache(output)
    del output
    next_positions = positions[:, -1] + 1
    generators = [
        torch.Generator().manual_seed(int(row.params.seed)) if row.params.temperature > 0 else None for row in rows
    ]
    # slots[j]: the row decoded at batch position j, or None once it finished. Finished rows are
    # dropped from the cache when it can shrink, else carried along (their outputs ignored).
    slots: list[int | None] = [index if row.params.max_new_tokens > 0 else None for index, row in enumerate(rows)]
    for row in rows:
        if row.params.max_new_tokens <= 0:
            row.finish_reason = FINISH_LENGTH
    can_shrink = _can_shrink(cache)
    while any(slot is not None for slot in slots):
        if cancelled is not None and cancelled():
            raise ShuttingDown("the server stopped while this request was being decoded")
        if can_shrink and None in slots:
            keep = torch.tensor([j for j, slot in enumerate(slots) if slot is not None], device=device)
            cache.batch_select_indices(keep)
            next_logits, mask, next_positions = next_logits[keep], mask[keep], next_positions[keep]
            slots = [slot for slot in slots if slot is not None]
        live = [(j, rows[slot]) for j, slot in enumerate(slots) if slot is not None]
        logits = next_logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        chosen = [0] * len(slots)
        for j, row in live:
            chosen[j] = greedy[j] if row.params.temperature == 0 else choose_token(logits[j], row.params, generators[slots[j]])  # type: ignore[index]
        chosen_tensor = torch.tensor(chosen, device=device)
        wanted = [row.params.logprobs for _, row in live if row.params.logprobs is not None]
        chosen_logprobs: list[float] = []
        top: list[list[tuple[int, float]]] | None = None
        if wanted:
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen_logprobs = logprobs.gather(1, chosen_tensor[:, None])[:, 0].tolist()
            top = _top(logprobs, max(wanted)) if max(wanted) > 0 else None
        for j, row in live:
            token = chosen[j]
            row.generated += 1
            if token in eos:
                row.finish_reason = FINISH_STOP
            else:
                row.tokens.append(token)
                if row.params.logprobs is not None:
                    row.logprobs.append(chosen_logprobs[j])
                    row.top_logprobs.append(top[j][: row.params.logprobs] if top is not None else [])
                if row.params.stop:
                    position = _find_stop(decode(row.tokens), row.params.stop)
                    if position >= 0:
                        _cut_at_stop(row, position, decode)
                if row.finish_reason is None and row.generated >= row.params.max_new_tokens:
                    row.finish_reason = FINISH_LENGTH
            if row.finish_reason is not None:
                slots[j] = None
        if all(slot is None for slot in slots):
            return
        if can_shrink and None in slots:
            keep = torch.tensor([j for j, slot in enumerate(slots) if slot is not None], device=device)
            cache.batch_select_indices(keep)
            mask, next_positions, chosen_tensor = mask[keep], next_positions[keep], chosen_tensor[keep]
            slots = [slot for slot in slots if slot is not None]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        output = forward(chosen_tensor[:, None], mask, next_positions[:, None], cache, False)
        cache = _output_cache(output)
        next_logits = output.logits[:, -1, :]
        next_positions = next_positions + 1
        del output


def _fill_prompt_logprobs(row: Row, logits: torch.Tensor) -> None:
    """Prompt token logprobs from the logits at positions 0..L-2 of the row's prompt."""
    k = row.params.prompt_logprobs or 0
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(row.prompt[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist() if len(targets) else []
    top = _top(logprobs, k)
    row.prompt_logprobs = [None, *chosen]
    row.prompt_top_logprobs = [None, *top]


# -- the batching thread ---------------------------------------------------------------------------


class ShuttingDown(RuntimeError):
    """The worker stopped before a queued request was decoded."""


class Job:
    """The rows of one request; ``wait()`` returns when all of them are decoded (or failed)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        for row in rows:
            row.owner = self
        self._remaining = len(rows)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        if not rows:
            self.done.set()

    def _finish_rows(self, count: int, error: BaseException | None = None) -> None:
        with self._lock:
            if error is not None and self.error is None:
                self.error = error
            self._remaining -= count
            if self._remaining <= 0:
                self.done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass
class BatchRecord:
    """What one batch did: its rows, the tokens they generated, the seconds it took, its error."""

    rows: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    error: BaseException | None = None


class BatchWorker:
    """A thread that decodes queued rows in batches of up to ``max_batch_size`` rows.

    When the queue holds fewer rows than that, the worker waits up to ``batch_wait_s`` after the
    first one for more to arrive. A request with ``n`` samples queues ``n`` rows, which may span
    batches. A batch that raises fails every request it holds (with the exception as
    ``Job.error``); the worker goes on with the next batch. ``on_batch`` is called after every batch
    with a :class:`BatchRecord`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_token_ids: Iterable[int],
        decode: Callable[[list[int]], str],
        pad_token_id: int,
        max_batch_size: int = 16,
        batch_wait_s: float = 0.01,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_ms must not be negative, got {batch_wait_s * 1000:g}")
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.on_batch = on_batch
        self._queue: deque[Row] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        with self._condition:
            return len(self._queue)

    def submit(self, rows: list[Row]) -> Job:
        """Queue ``rows`` (one request) and return their :class:`Job`."""
        job = Job(rows)
        with self._condition:
            if self._stopping:
                job._finish_rows(len(rows), ShuttingDown("the server is shutting down"))
                return job
            self._queue.extend(rows)
            self._condition.notify_all()
        return job

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="distill-serve-batches", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the running batch at its next decoding step and fail its rows and the queued ones
        with :class:`ShuttingDown`; end the thread (so no decoding outlives the server)."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _next_batch(self) -> list[Row] | None:
        with self._condition:
            while not self._queue and not self._stopping:
                self._condition.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            if self._stopping:
                return None
            return [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                decode_batch(
                    self.model, batch, eos_token_ids=self.eos_token_ids, decode=self.decode, pad_token_id=self.pad_token_id,
                    cancelled=lambda: self._stopping,
                )
            except Exception as caught:  # noqa: BLE001 - reported to the requests, the worker keeps serving
                error = caught
            record = BatchRecord(
                rows=len(batch),
                prompt_tokens=sum(len(row.prompt) for row in batch),
                generated_tokens=sum(row.generated for row in batch),
                seconds=time.perf_counter() - started,
                error=error,
            )
            self._complete(batch, error)
            if self.on_batch is not None:
                try:
                    self.on_batch(record)
                except Exception:  # noqa: BLE001 - statistics must never stop the worker
                    pass
        with self._condition:
            left = list(self._queue)
            self._queue.clear()
        self._complete(left, ShuttingDown("the server is shutting down"))

    @staticmethod
    def _complete(rows: list[Row], error: BaseException | None) -> None:
        counts: dict[int, tuple[Job, int]] = {}
        for row in rows:
            job = row.owner
            previous = counts.get(id(job), (job, 0))
            counts[id(job)] = (job, previous[1] + 1)
        for job, count in counts.values():
            if job is not None:
                job._finish_rows(count, error)
