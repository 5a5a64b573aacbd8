"""The OpenAI request and response shapes of ``distill serve``: parsing, checking, formatting.

Requests are checked field by field; every problem raises :class:`APIError` with the HTTP status,
a message naming the field and the OpenAI error body ``{"error": {"message", "type", "param",
"code"}}``. Invalid fields are 400 (OpenAI's ``invalid_request_error``), never 422, so a client
needs one case. Fields the server does not implement are refused (400, ``unsupported_parameter``)
rather than silently ignored, except the few that change nothing (``user``, ``store``,
``metadata``, ``service_tier``, ``stream_options``) and penalties or biases left at their neutral
values.

Token strings in logprobs are each token decoded alone (special tokens shown), with ``bytes`` the
token's raw bytes (for byte-level BPE, the bytes behind a partial UTF-8 character that decodes as
U+FFFD). ``return_tokens_as_token_ids`` (an extension from vLLM: Kwon et al., "Efficient Memory
Management for Large Language Model Serving with PagedAttention", SOSP 2023) reports them as
``token_id:123`` instead, which is unambiguous.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from distill.engine.batches import derive_seed
from distill.serve.engine import Row, SamplingParams

MAX_TOP_LOGPROBS = 20  # the default limit of ``logprobs`` / ``top_logprobs`` (OpenAI's and vLLM's)
MAX_N = 128
MAX_ROWS_PER_REQUEST = 1024
MAX_STOP_SEQUENCES = 16
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
NEUTRAL_IGNORED = frozenset({"user", "store", "metadata", "service_tier", "stream_options"})
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a probability that underflows


class APIError(Exception):
    """A request that cannot be served: HTTP ``status`` and the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI field name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# -- tokenizer access ------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


_UNICODE_TO_BYTE = {character: byte for byte, character in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TextCodec:
    """Thread-safe access to a Hugging Face tokenizer: encode, decode, chat prompts, token strings.

    One lock serializes the calls (fast tokenizers may refuse concurrent use); token strings and
    bytes are cached per id.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.RLock()
        self._text: dict[int, str] = {}
        self._piece: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        with self._lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` through the chat template, with the generation prompt."""
        with self._lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(str(text), special=False)

    def token_text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.decode([token], skip_special=False)
        return self._text[token]

    def token_piece(self, token: int) -> str:
        """The token's share of decoded text (special tokens skipped, as in completion texts)."""
        if token not in self._piece:
            self._piece[token] = self.decode([token], skip_special=True)
        return self._piece[token]

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token, also when it holds part of a UTF-8 character."""
        if token not in self._bytes:
            text = self.token_text(token)
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                with self._lock:
                    piece = self.tokenizer.convert_ids_to_tokens(token)
                if isinstance(piece, str):
                    fallback = _BYTE_FALLBACK.match(piece)
                    if fallback:
                        raw = bytes([int(fallback.group(1), 16)])
                    elif piece and all(character in _UNICODE_TO_BYTE for character in piece):
                        raw = bytes(_UNICODE_TO_BYTE[character] for character in piece)
            self._bytes[token] = raw
        return self._bytes[token]


@dataclass(frozen=True)
class ModelInfo:
    """What request checking needs to know about the served model."""

    name: str
    codec: TextCodec
    vocab_size: int
    context_length: int | None
    max_new_tokens_limit: int
    max_logprobs: int = MAX_TOP_LOGPROBS


def _top_count(body: dict, name: str, info: ModelInfo) -> int | None:
    """``logprobs`` (completions) or ``top_logprobs`` (chat): 0..the server's ``max_logprobs``."""
    value = _get_int(body, name, None, 0, None)
    if value is not None and value > info.max_logprobs:
        raise invalid(
            f"'{name}' is {value}, above this server's limit of {info.max_logprobs} most likely tokens "
            "(distill serve --max-logprobs raises it)", name,
        )
    return value


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence (prompt + completion) the model takes, from its config (None: unknown)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None


# -- field checks ----------------------------------------------------------------------------------


def _get_int(body: dict, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {_show(value)}", name, "invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}"
        )
        raise invalid(f"'{name}' must be {bounds}, got {value}", name)
    return value


def _get_float(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{name}' must be a number, got {_show(value)}", name, "invalid_type")
    value = float(value)
    inside = (low < value if open_low else low <= value) and value <= high
    if not inside or not math.isfinite(value):
        bounds = f"in ({low:g}, {high:g}]" if open_low else f"between {low:g} and {high:g}"
        raise invalid(f"'{name}' must be {bounds}, got {value:g}", name)
    return value


def _get_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {_show(value)}", name, "invalid_type")
    return value


def _get_stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise invalid(f"'stop' must be a string or a list of strings, got {_show(value)}", "stop", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop' has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed", "stop")
    if any(stop == "" for stop in stops):
        raise invalid("'stop' sequences must not be empty strings", "stop")
    return tuple(dict.fromkeys(stops))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(body: dict, known: set[str]) -> None:
    """Refuse fields this server does not implement, unless they are at their neutral values."""
    if body.get("stream"):
        raise invalid(
            "'stream': true is not supported by distill serve; send stream: false (the default) and read the "
            "whole response", "stream", "unsupported_parameter",
        )
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = body.get(name)
        if value is not None and value != (1 if name == "repetition_penalty" else 0):
            raise invalid(f"'{name}' is not supported by distill serve (only its neutral value)", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise invalid("'logit_bias' is not supported by distill serve", "logit_bias", "unsupported_parameter")
    for name in ("tools", "tool_choice", "functions", "function_call", "suffix"):
        if body.get(name):
            raise invalid(f"'{name}' is not supported by distill serve", name, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise invalid("'response_format' other than {\"type\": \"text\"} is not supported", "response_format", "unsupported_parameter")
    neutral = {"stream", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "tools",
               "tool_choice", "functions", "function_call", "suffix", "response_format", "parallel_tool_calls"}
    for name in body:
        if name not in known and name not in neutral and name not in NEUTRAL_IGNORED:
            raise invalid(
                f"unsupported field '{name}'; this endpoint accepts: {', '.join(sorted(known))}", name, "unsupported_parameter"
            )


def check_model(body: dict, info: ModelInfo) -> None:
    """404 when the request names another model; a request without ``model`` gets the served one."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_show(model)}", "model", "invalid_type")
    if model != info.name:
        raise APIError(404, f"model '{model}' does not exist; this server serves '{info.name}'", param="model",
                       code="model_not_found")


# -- plans: what a request asks for ---------------------------------------------------------------


@dataclass
class Plan:
    """A checked request: its prompts (token ids), samples per prompt and decoding settings."""

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    params: list[SamplingParams]  # one per prompt (budgets differ when max_tokens defaults to the context)
    seed: int | None
    echo: bool = False
    logprobs: int | None = None
    token_ids: bool = False
    rows: list[Row] = field(default_factory=list)

    def make_rows(self, unseeded: int) -> list[Row]:
        """One row per (prompt, sample), prompt-major. Sample ``j`` is seeded from (``seed``, ``j``), so a
        seeded prompt gives the same samples alone, in a batch of prompts or beside other requests;
        without ``seed``, from ``unseeded`` (a per-request number the server draws)."""
        rows = []
        for p, (prompt, params) in enumerate(zip(self.prompts, self.params)):
            for j in range(self.n):
                seed = derive_seed(self.seed, "sample", j) if self.seed is not None else derive_seed(unseeded, p, j)
                rows.append(Row(list(prompt), replace(params, seed=seed)))
        self.rows = rows
        return rows


def _budget(
    body: dict, info: ModelInfo, prompt_length: int, name: str, default: int | None, *, echo: bool, prompt_param: str
) -> int:
    """The completion budget of one prompt, checked against the context and the server's limit."""
    context = info.context_length
    limit = info.max_new_tokens_limit
    requested = _get_int(body, name, None, 0 if echo else 1, None)
    if requested is not None and requested > limit:
        raise invalid(f"'{name}' is {requested}, above this server's limit of {limit} new tokens", name)
    if context is not None and prompt_length >= context + (1 if requested == 0 else 0):
        raise invalid(
            f"the prompt has {prompt_length} tokens, which leaves no room in the model's context of {context} tokens",
            prompt_param, "context_length_exceeded",
        )
    if requested is None:
        requested = default if default is not None else min(limit, (context - prompt_length) if context else limit)
    if context is not None and prompt_length + requested > context:
        raise invalid(
            f"the prompt has {prompt_length} tokens and '{name}' is {requested}: {prompt_length + requested} is more "
            f"than the model's context of {context} tokens; lower '{name}' or shorten the prompt",
            name, "context_length_exceeded",
        )
    return requested


def _check_ids(ids: list[Any], info: ModelInfo, where: str) -> list[int]:
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise invalid(f"{where} must hold integer token ids, found {_show(token)}", "prompt", "invalid_type")
        if not 0 <= token < info.vocab_size:
            raise invalid(f"{where} holds token id {token}, outside the vocabulary 0..{info.vocab_size - 1}", "prompt")
    return list(ids)


def _prompts(value: Any, info: ModelInfo) -> tuple[list[list[int]], list[str]]:
    """A completion ``prompt``: a string, a list of token ids, or a list of either (a batch)."""
    if value is None:
        raise invalid("'prompt' is required: a string, a list of token ids, or a list of those", "prompt", "missing_field")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(item, (str, list)) for item in value):
        items = value
    else:
        raise invalid(
            f"'prompt' must be a string, a list of token ids, or a non-empty list of those, got {_show(value)}",
            "prompt", "invalid_type",
        )
    prompts, texts = [], []
    for index, item in enumerate(items):
        where = "'prompt'" if len(items) == 1 else f"'prompt'[{index}]"
        if isinstance(item, str):
            ids = info.codec.encode(item)
            text = item
        else:
            ids = _check_ids(item, info, where)
            text = info.codec.decode(ids, skip_special=False)
        if not ids:
            raise invalid(f"{where} is empty: a prompt needs at least one token", "prompt")
        prompts.append(ids)
        texts.append(text)
    return prompts, texts


COMPLETION_FIELDS = {
    "model", "prompt", "n", "best_of", "max_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "echo",
    "return_tokens_as_token_ids",
}
CHAT_FIELDS = {
    "model", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "logprobs",
    "top_logprobs", "return_tokens_as_token_ids",
}


def _common(body: dict) -> tuple[int, float, float, tuple[str, ...], int | None, bool]:
    n = _get_int(body, "n", 1, 1, MAX_N)
    temperature = _get_float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _get_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
    seed = _get_int(body, "seed", None)
    token_ids = _get_bool(body, "return_tokens_as_token_ids", False)
    assert n is not None
    return n, temperature, top_p, _get_stop(body), seed, token_ids


def parse_completion(body: dict, info: ModelInfo) -> Plan:
    """Check a ``/v1/completions`` body and turn it into a :class:`Plan`."""
    _check_fields(body, COMPLETION_FIELDS)
    check_model(body, info)
    n, temperature, top_p, stop, seed, token_ids = _common(body)
    best_of = _get_int(body, "best_of", None)
    if best_of is not None and best_of != n:
        raise invalid(f"'best_of' ({best_of}) different from 'n' ({n}) is not supported", "best_of", "unsupported_parameter")
    logprobs = _top_count(body, "logprobs", info)
    echo = _get_bool(body, "echo", False)
    prompts, texts = _prompts(body.get("prompt"), info)
    if len(prompts) * n > MAX_ROWS_PER_REQUEST:
        raise invalid(f"{len(prompts)} prompts x n={n} is more than {MAX_ROWS_PER_REQUEST} sequences per request", "n")
    params = []
    for prompt in prompts:
        budget = _budget(body, info, len(prompt), "max_tokens", DEFAULT_COMPLETION_TOKENS, echo=echo, prompt_param="prompt")
        params.append(SamplingParams(
            max_new_tokens=budget, temperature=temperature, top_p=top_p, stop=stop, logprobs=logprobs,
            prompt_logprobs=logprobs if echo and logprobs is not None else None,
        ))
    return Plan("completion", prompts, texts, n, params, seed, echo=echo, logprobs=logprobs, token_ids=token_ids)


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise invalid("'messages' is required: a list of {role, content} objects", "messages", "missing_field")
    if not isinstance(value, list) or not value:
        raise invalid(f"'messages' must be a non-empty list of {{role, content}} objects, got {_show(value)}", "messages", "invalid_type")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content', got {_show(message)}", where, "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role must be a non-empty string, got {_show(role)}", f"{where}.role", "invalid_type")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part_index, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(
                        f"{where}.content[{part_index}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                        "other content types are not supported", f"{where}.content", "invalid_type",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts, got {_show(content)}", f"{where}.content", "invalid_type")
        messages.append({**message, "content": content})
    return messages


def parse_chat(body: dict, info: ModelInfo) -> Plan:
    """Check a ``/v1/chat/completions`` body and turn it into a :class:`Plan`."""
    _check_fields(body, CHAT_FIELDS)
    check_model(body, info)
    n, temperature, top_p, stop, seed, token_ids = _common(body)
    want_logprobs = _get_bool(body, "logprobs", False)
    top_logprobs = _top_count(body, "top_logprobs", info)
    if top_logprobs is not None and top_logprobs > 0 and not want_logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise invalid("give 'max_completion_tokens' or 'max_tokens', not two different values", "max_completion_tokens")
        name = "max_completion_tokens"
    messages = _messages(body.get("messages"))
    if not info.codec.has_chat_template:
        raise invalid(
            f"the tokenizer of '{info.name}' has no chat template; use /v1/completions with a plain prompt",
            "messages", "no_chat_template",
        )
    try:
        prompt = info.codec.chat_prompt(messages)
    except Exception as error:  # noqa: BLE001 - the template's own message is the useful one
        raise invalid(f"the chat template rejected the messages: {error}", "messages") from None
    budget = _budget(body, info, len(prompt), name, None, echo=False, prompt_param="messages")
    params = SamplingParams(
        max_new_tokens=budget, temperature=temperature, top_p=top_p, stop=stop,
        logprobs=(top_logprobs or 0) if want_logprobs else None,
    )
    return Plan("chat", [prompt], [""], n, [params], seed, logprobs=params.logprobs, token_ids=token_ids)


# -- responses -------------------------------------------------------------------------------------


def _finite(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


class _Names:
    def __init__(self, codec: TextCodec, token_ids: bool) -> None:
        self.codec = codec
        self.token_ids = token_ids

    def __call__(self, token: int) -> str:
        return f"token_id:{token}" if self.token_ids else self.codec.token_text(token)


def _top_dict(names: _Names, top: list[tuple[int, float]], chosen: int, chosen_logprob: float) -> dict[str, float]:
    """OpenAI's legacy ``top_logprobs`` entry: the top-k plus the chosen token, most likely first."""
    entries = list(top)
    if chosen not in {token for token, _ in entries}:
        entries.append((chosen, chosen_logprob))
    entries.sort(key=lambda entry: -entry[1])
    result: dict[str, float] = {}
    for token, logprob in entries:
        result.setdefault(names(token), _finite(logprob))
    return result


def _completion_logprobs(plan: Plan, row: Row, names: _Names, prompt_text: str) -> dict[str, Any]:
    """OpenAI's legacy logprobs object. ``text_offset`` adds up the length of each token decoded
    alone (prompt tokens with special tokens shown, generated ones without), so it is exact for
    tokens that hold whole characters and approximate around characters split across tokens."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0 if plan.echo else len(prompt_text)
    entries: list[tuple[int, float | None, list[tuple[int, float]] | None, bool]] = []
    if plan.echo:
        entries += [(*entry, True) for entry in zip(row.prompt, row.prompt_logprobs, row.prompt_top_logprobs)]
    entries += [(*entry, False) for entry in zip(row.tokens, row.logprobs, row.top_logprobs)]
    for token, logprob, top, in_prompt in entries:
        tokens.append(names(token))
        offsets.append(offset)
        offset += len(names.codec.token_text(token) if in_prompt else names.codec.token_piece(token))
        if logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(_finite(logprob))
            top_logprobs.append(_top_dict(names, top or [], token, logprob))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def _usage(plan: Plan) -> dict[str, int]:
    prompt_tokens = sum(len(prompt) for prompt in plan.prompts)
    completion_tokens = sum(row.generated for row in plan.rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _response(id_prefix: str, kind: str, plan: Plan, info: ModelInfo, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """The response object around ``choices``: a fresh ``<id_prefix>-...`` id, ``object`` ``kind``, the model and usage."""
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": info.name,
        "choices": choices,
        "usage": _usage(plan),
    }


def completion_response(plan: Plan, info: ModelInfo) -> dict[str, Any]:
    """The ``text_completion`` object of a decoded completion plan."""
    names = _Names(info.codec, plan.token_ids)
    choices = []
    for index, row in enumerate(plan.rows):
        prompt_text = plan.prompt_texts[index // plan.n]
        text = (prompt_text if plan.echo else "") + row.text
        choices.append({
            "index": index,
            "text": text,
            "logprobs": _completion_logprobs(plan, row, names, prompt_text) if plan.logprobs is not None else None,
            "finish_reason": row.finish_reason,
        })
    return _response("cmpl", "text_completion", plan, info, choices)


def _chat_entry(names: _Names, token: int, logprob: float) -> dict[str, Any]:
    return {"token": names(token), "logprob": _finite(logprob), "bytes": list(names.codec.token_bytes(token))}


def chat_response(plan: Plan, info: ModelInfo) -> dict[str, Any]:
    """The ``chat.completion`` object of a decoded chat plan."""
    names = _Names(info.codec, plan.token_ids)
    choices = []
    for index, row in enumerate(plan.rows):
        logprobs = None
        if plan.logprobs is not None:
            logprobs = {"content": [
                {**_chat_entry(names, token, logprob), "top_logprobs": [_chat_entry(names, t, lp) for t, lp in top]}
                for token, logprob, top in zip(row.tokens, row.logprobs, row.top_logprobs)
            ]}
        choices.append({
            "index": index,
            "message": {"role": "assistant", "content": row.text},
            "logprobs": logprobs,
            "finish_reason": row.finish_reason,
        })
    return _response("chatcmpl", "chat.completion", plan, info, choices)

