"""``distill serve``: an OpenAI-compatible HTTP server for a causal language model.

Standard library only: a ``ThreadingHTTPServer`` parses and checks requests on one thread per
connection and hands their rows to a :class:`~distill.serve.engine.BatchWorker`, which decodes
concurrent requests together (up to ``max_batch_size`` sequences, waiting at most
``batch_wait_ms`` for a batch to fill). Endpoints::

    GET  /health                 {"status": "ok"}; needs no key
    GET  /v1/models              the served model (OpenAI list shape)
    GET  /v1/models/{name}       the served model, or 404
    POST /v1/completions         prompt: string, token ids, or a list of those
    POST /v1/chat/completions    messages through the tokenizer's chat template
    GET  /stats                  requests, sequences, tokens, batches, mean batch size, throughput

In Python::

    from distill.serve import TeacherServer, load_served_model

    model, tokenizer, name = load_served_model("smollm2-135m-instruct")
    with TeacherServer(model, tokenizer, name=name) as server:
        print(server.url)            # http://127.0.0.1:PORT/v1 (a free port)

With ``api_key`` set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``; the key
is compared in constant time and never logged or echoed. Access lines (client, method, path,
status, milliseconds, sequences and tokens) go to the ``log`` callable, without prompt text.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

from distill.engine.batches import derive_seed
from distill.models.causal_lm import CausalLM
from distill.serve.engine import BatchRecord, BatchWorker, ShuttingDown
from distill.serve.protocol import (
    MAX_TOP_LOGPROBS,
    APIError,
    ModelInfo,
    Plan,
    TextCodec,
    chat_response,
    completion_response,
    context_length,
    parse_chat,
    parse_completion,
)

ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",),
    "/stats": ("GET",),
    "/v1/models": ("GET",),
    "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",),
}
MODEL_PREFIX = "/v1/models/"
OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hf_model(model: Any) -> torch.nn.Module:
    """The Hugging Face model inside a distill ``CausalLM`` wrapper (or the model itself)."""
    if isinstance(model, CausalLM):
        return model.model
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"TeacherServer needs a Hugging Face causal LM (a module with .config), got {type(model).__name__}")
    return model


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every token that ends a sequence: the tokenizer's EOS and those of the model's configs."""
    found: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(model.config, "eos_token_id", None)]
    for value in sources:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and token not in found:
                found.append(token)
    return found


class _Stats:
    """Counters behind ``/stats``; updated by the handler threads and the batching thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[str, int] = {"total": 0, "completions": 0, "chat": 0, "errors_4xx": 0, "errors_5xx": 0}
        self.sequences = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.batches = 0
        self.failed_batches = 0
        self.largest_batch = 0
        self.busy_s = 0.0

    def request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests["total"] += 1
            if path == "/v1/completions":
                self.requests["completions"] += 1
            elif path == "/v1/chat/completions":
                self.requests["chat"] += 1
            if 400 <= status < 500:
                self.requests["errors_4xx"] += 1
            elif status >= 500:
                self.requests["errors_5xx"] += 1

    def batch(self, record: BatchRecord) -> None:
        with self._lock:
            self.batches += 1
            self.failed_batches += record.error is not None
            self.sequences += record.rows
            self.prompt_tokens += record.prompt_tokens
            self.generated_tokens += record.generated_tokens
            self.largest_batch = max(self.largest_batch, record.rows)
            self.busy_s += record.seconds

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": dict(self.requests),
                "sequences": self.sequences,
                "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "batches": self.batches,
                "failed_batches": self.failed_batches,
                "mean_batch_size": round(self.sequences / self.batches, 4) if self.batches else 0.0,
                "largest_batch": self.largest_batch,
                "busy_s": round(self.busy_s, 4),
                "generated_tokens_per_busy_s": round(self.generated_tokens / self.busy_s, 2) if self.busy_s else 0.0,
            }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: TeacherServer) -> None:
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "distill-serve"
    sys_version = ""
    timeout = 120  # an idle keep-alive connection is closed after this many seconds
    server: _HTTPServer

    body_read = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Silence the default stderr lines; :meth:`TeacherServer._handle` writes the access log."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors ``http.server`` raises itself (bad request line, unknown method) as OpenAI JSON too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        body = {"error": {"message": message or explain or phrase, "type": "invalid_request_error" if code < 500 else "server_error",
                          "param": None, "code": None}}
        data = json.dumps(body).encode("utf-8")
        self.close_connection = True
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.app._handle(self, "GET")

    def do_POST(self) -> None:  # noqa: N802
        self.server.app._handle(self, "POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.server.app._handle(self, "PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.server.app._handle(self, "DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self.server.app._handle(self, "PATCH")

    def do_OPTIONS(self) -> None:  # noqa: N802
        self.server.app._handle(self, "OPTIONS")


class TeacherServer:
    """An OpenAI-compatible HTTP server for one causal LM, with batched decoding.

    ``model`` is a Hugging Face causal LM (or distill's ``CausalLM`` wrapper), ``tokenizer`` its
    tokenizer; ``name`` is the model name clients send. ``port`` 0 picks a free port. The server
    binds ``host`` (loopback by default). ``api_key`` (None: no key) is required as a bearer token
    on every endpoint but ``/health``. ``max_batch_size`` sequences are decoded together, after
    waiting up to ``batch_wait_ms`` for a batch to fill; a request may ask for at most
    ``max_new_tokens_limit`` new tokens per sequence, and at most ``max_logprobs`` most likely tokens
    per position (``logprobs`` / ``top_logprobs``; 20 as in OpenAI's API and vLLM, more for offline
    teacher caches, whose top-k is read from the prompt's logprobs). ``seed`` makes requests without a ``seed`` of
    their own reproducible for a given arrival order. ``log`` receives one access line per request
    (None: no log); request bodies larger than ``max_body_bytes`` get 413.

    ``start()`` serves on background threads and returns :attr:`url`; ``serve_forever()`` serves on
    the calling thread until ``stop()`` or Ctrl-C; the server is also a context manager.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        max_batch_size: int = 16,
        batch_wait_ms: float = 10,
        max_new_tokens_limit: int = 1024,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
        max_logprobs: int = MAX_TOP_LOGPROBS,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("TeacherServer needs a non-empty model `name`")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be between 0 and 65535, got {port}")
        if max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be at least 1, got {max_new_tokens_limit}")
        if max_logprobs < 0:
            raise ValueError(f"max_logprobs must be at least 0, got {max_logprobs}")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be a non-empty string or None (no key)")
        self.model = _hf_model(model).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.host = host
        self.port = int(port)
        self.seed = int(seed)
        self.max_body_bytes = int(max_body_bytes)
        self._api_key = api_key.encode("utf-8") if api_key else None
        self._log = log
        self.codec = TextCodec(tokenizer)
        head = self.model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else len(tokenizer)
        self.info = ModelInfo(
            name=name,
            codec=self.codec,
            vocab_size=int(vocab),
            context_length=context_length(self.model.config, tokenizer),
            max_new_tokens_limit=int(max_new_tokens_limit),
            max_logprobs=int(max_logprobs),
        )
        self._stats = _Stats()
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = eos_token_ids(self.model, tokenizer)
        self.worker = BatchWorker(
            self.model,
            eos_token_ids=eos,
            decode=self.codec.decode,
            pad_token_id=pad if isinstance(pad, int) else (eos[0] if eos else 0),
            max_batch_size=int(max_batch_size),
            batch_wait_s=float(batch_wait_ms) / 1000.0,
            on_batch=self._on_batch,
        )
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_ms = float(batch_wait_ms)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._request_counter = 0
        self._counter_lock = threading.Lock()
        self._serving = threading.Event()

    # -- life cycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL clients use (``http://HOST:PORT/v1``); the port is known once bound."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def bind(self) -> str:
        """Listen on the port (a free one when ``port`` is 0) and start the batching thread; returns
        :attr:`url`. Requests are answered once :meth:`start` or :meth:`serve_forever` runs."""
        self._bind()
        return self.url

    def _bind(self) -> _HTTPServer:
        if self._httpd is None:
            try:
                self._httpd = _HTTPServer((self.host, self.port), self)
            except OSError as error:
                raise OSError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from error
            self.port = int(self._httpd.server_address[1])
            self.worker.start()
        return self._httpd

    def start(self) -> str:
        """Serve on background threads; returns :attr:`url`."""
        httpd = self._bind()
        if self._thread is None:
            self._serving.set()
            self._thread = threading.Thread(target=httpd.serve_forever, name="distill-serve-http", daemon=True)
            self._thread.start()
        return self.url

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`stop` is called from another thread (or Ctrl-C)."""
        httpd = self._bind()
        self._serving.set()
        try:
            httpd.serve_forever()
        finally:
            self._serving.clear()
            self._close()

    def stop(self) -> None:
        """Stop accepting requests, fail queued ones with 503, and release the port."""
        httpd = self._httpd
        if httpd is None:
            return
        if self._serving.is_set():
            httpd.shutdown()  # returns once the serving loop has left; from another thread than that loop's
            self._serving.clear()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        httpd, self._httpd = self._httpd, None
        self.worker.stop(timeout=30.0)
        if httpd is not None:
            httpd.server_close()

    def __enter__(self) -> TeacherServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Served counts: requests, sequences, tokens, batches, mean batch size, throughput."""
        return {
            "model": self.name,
            **self._stats.snapshot(),
            "queued_sequences": self.worker.queued,
            "max_batch_size": self.max_batch_size,
            "batch_wait_ms": self.batch_wait_ms,
        }

    # -- requests --------------------------------------------------------------------------------

    def _on_batch(self, record: BatchRecord) -> None:
        self._stats.batch(record)
        if record.error is not None:
            self._write_log(f"batch of {record.rows} sequences failed: {type(record.error).__name__}: {record.error}")

    def _write_log(self, line: str) -> None:
        if self._log is not None:
            try:
                self._log(line)
            except Exception:  # noqa: BLE001 - a failing log must not fail requests
                pass

    def _authorized(self, handler: BaseHTTPRequestHandler) -> None:
        if self._api_key is None:
            return
        header = handler.headers.get("Authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="distill"'}
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key",
                           type="authentication_error", headers=challenge)
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode("utf-8"), self._api_key):
            raise APIError(401, "invalid API key", code="invalid_api_key", type="authentication_error", headers=challenge)

    def _read_json(self, handler: BaseHTTPRequestHandler) -> dict[str, Any]:
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "chunked request bodies are not supported; send a Content-Length header", code="length_required")
        length_header = handler.headers.get("Content-Length")
        if length_header is None:
            raise APIError(411, "the request has no Content-Length header", code="length_required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            raise APIError(400, f"invalid Content-Length header {length_header[:20]!r}", code="invalid_request") from None
        if length > self.max_body_bytes:
            raise APIError(413, f"the request body has {length} bytes; this server accepts at most {self.max_body_bytes}",
                           code="request_too_large")
        raw = handler.rfile.read(length)
        handler.body_read = True  # type: ignore[attr-defined]
        if len(raw) < length:
            raise APIError(400, f"the request body ended after {len(raw)} of {length} bytes", code="invalid_request")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    def _generate(self, plan: Plan) -> None:
        with self._counter_lock:
            self._request_counter += 1
            unseeded = self._request_counter
        rows = plan.make_rows(derive_seed(self.seed, "request", unseeded))
        job = self.worker.submit(rows)
        job.wait()
        if isinstance(job.error, ShuttingDown):
            raise APIError(503, "the server is shutting down", code="unavailable")
        if job.error is not None:
            raise APIError(500, f"internal error while decoding: {type(job.error).__name__}: {str(job.error)[:300]}",
                           code="internal_error") from job.error

    def _route(self, handler: BaseHTTPRequestHandler, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """(status, JSON body, details for the access log) of one request."""
        allowed = ROUTES.get(path) or (("GET",) if path.startswith(MODEL_PREFIX) else None)
        if allowed is None:
            raise APIError(404, f"no such endpoint: {method} {path}", code="not_found")
        if method not in allowed:
            raise APIError(405, f"{path} accepts {', '.join(allowed)}, not {method}", code="method_not_allowed",
                           headers={"Allow": ", ".join(allowed)})
        if path not in OPEN_PATHS:
            self._authorized(handler)
        if path == "/health":
            return 200, {"status": "ok"}, {}
        if path == "/stats":
            return 200, self.stats(), {}
        if path == "/v1/models":
            return 200, {"object": "list", "data": [self._model_card()]}, {}
        if path.startswith(MODEL_PREFIX):
            requested = unquote(path[len(MODEL_PREFIX):])
            if requested != self.name:
                raise APIError(404, f"model '{requested}' does not exist; this server serves '{self.name}'",
                               param="model", code="model_not_found")
            return 200, self._model_card(), {}
        body = self._read_json(handler)
        if path == "/v1/completions":
            plan = parse_completion(body, self.info)
            self._generate(plan)
            response = completion_response(plan, self.info)
        else:
            plan = parse_chat(body, self.info)
            self._generate(plan)
            response = chat_response(plan, self.info)
        return 200, response, {"sequences": len(plan.rows), "tokens": response["usage"]["completion_tokens"]}

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": int(self._stats.started),
            "owned_by": "distill",
            "max_model_len": self.info.context_length,
        }

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        started = time.perf_counter()
        path = urlsplit(handler.path).path
        headers: dict[str, str] = {}
        details: dict[str, Any] = {}
        try:
            status, payload, details = self._route(handler, method, path)
        except APIError as error:
            status, payload, headers = error.status, error.body(), error.headers
            if error.status >= 500 and error.__cause__ is not None:
                self._write_log("".join(traceback.format_exception(error.__cause__)).rstrip())
        except Exception as error:  # noqa: BLE001 - any failure is a 500 and the server goes on
            status = 500
            payload = APIError(500, f"internal error: {type(error).__name__}: {str(error)[:300]}", code="internal_error").body()
            self._write_log("".join(traceback.format_exception(error)).rstrip())
        has_body = handler.headers.get("Content-Length") not in (None, "0") or "Transfer-Encoding" in handler.headers
        if has_body and not getattr(handler, "body_read", False):
            handler.close_connection = True  # an unread body would be taken for the next request
        data = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")
        self._stats.request(path, status)  # counted before the reply, so a client never sees it uncounted
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                handler.send_header(key, value)
            if handler.close_connection:
                handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        extra = "".join(f" {key}={value}" for key, value in details.items())
        client = handler.client_address[0] if handler.client_address else "-"
        self._write_log(f'{client} "{method} {path}" {status} {(time.perf_counter() - started) * 1000:.0f}ms{extra}')
