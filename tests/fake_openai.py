"""A scriptable OpenAI-compatible HTTP server on 127.0.0.1 for testing black-box teacher clients.

It answers ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` with
deterministic bodies that carry a serial number (so a response replayed from a cache can be told
from a fresh one), records every request (method, path, headers, body) and the largest number of
requests it held at once, and can be told to misbehave for the next requests: answer a status
with a JSON error and headers, hang, drop the connection, or send a body that is not JSON.

    with FakeOpenAI() as server:
        server.fail(503, times=2, headers={"Retry-After": "1"})
        ...  # a client of server.url
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Match = Callable[[dict[str, Any] | None], bool]


class FakeOpenAI:
    """The server; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(self, models: tuple[str, ...] = ("teacher-a", "teacher-b"), delay: float = 0.0) -> None:
        self.models = list(models)
        self.delay = delay
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0
        self._script: list[dict[str, Any]] = []
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeOpenAI:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------ scripting

    def fail(
        self,
        status: int,
        times: int | None = 1,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        match: Match | None = None,
    ) -> None:
        """Answer ``status`` with an OpenAI-style JSON error ``times`` times (``None``: always)."""
        body = {"error": {"message": message or f"scripted {status}", "type": "scripted", "code": status}}
        action = {"kind": "status", "status": status, "body": json.dumps(body).encode(), "headers": headers or {}}
        self._add(action, times, match)

    def hang(self, seconds: float, times: int | None = 1, match: Match | None = None) -> None:
        """Hold the request ``seconds`` before answering normally."""
        self._add({"kind": "hang", "seconds": seconds}, times, match)

    def drop(self, times: int | None = 1, match: Match | None = None) -> None:
        """Close the connection without answering."""
        self._add({"kind": "drop"}, times, match)

    def raw(self, status: int, body: bytes, times: int | None = 1, match: Match | None = None) -> None:
        """Answer ``status`` with ``body`` as it is."""
        self._add({"kind": "status", "status": status, "body": body, "headers": {}}, times, match)

    def posts(self) -> list[dict[str, Any]]:
        """The recorded POST requests."""
        with self.lock:
            return [request for request in self.requests if request["method"] == "POST"]

    def _add(self, action: dict[str, Any], times: int | None, match: Match | None) -> None:
        with self.lock:
            self._script.append({**action, "left": times, "match": match})

    def _next_action(self, body: dict[str, Any] | None) -> dict[str, Any] | None:
        for action in self._script:
            if action["match"] is not None and not action["match"](body):
                continue
            if action["left"] is not None:
                action["left"] -= 1
                if action["left"] == 0:
                    self._script.remove(action)
            return action
        return None

    # ------------------------------------------------------------------ normal answers

    def answer(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            return 404, {"error": {"message": f"no route {method} {path}"}}
        assert body is not None
        if body.get("model") not in self.models:
            return 404, {"error": {"message": f"the model {body.get('model')!r} does not exist"}}
        with self.lock:
            self.served += 1
            serial = self.served
        n = int(body.get("n", 1))
        chat = path.endswith("chat/completions")
        seen = body["messages"][-1]["content"] if chat else body["prompt"]
        choices = []
        for index in range(n):
            text = f"{seen}->{serial}.{index}"
            tokens = [f"{seen}", f"->{serial}.{index}"]
            choice: dict[str, Any] = {"index": index, "finish_reason": "length" if index else "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if body.get("logprobs"):
                    k = int(body.get("top_logprobs") or 0)
                    choice["logprobs"] = {
                        "content": [
                            {
                                "token": token,
                                "logprob": -0.25 * (position + 1),
                                "bytes": list(token.encode()),
                                "top_logprobs": [
                                    {"token": token, "logprob": -0.25 * (position + 1), "bytes": []},
                                    {"token": "other", "logprob": -3.0, "bytes": []},
                                ][:k],
                            }
                            for position, token in enumerate(tokens)
                        ]
                    }
            else:
                choice["text"] = text
                if body.get("logprobs") is not None:
                    k = int(body["logprobs"])
                    choice["logprobs"] = {
                        "tokens": tokens,
                        "token_logprobs": [-0.25 * (position + 1) for position in range(len(tokens))],
                        "top_logprobs": [
                            dict(list({token: -0.25 * (position + 1), "other": -3.0}.items())[:k])
                            for position, token in enumerate(tokens)
                        ],
                        "text_offset": [0, len(tokens[0])],
                    }
            choices.append(choice)
        choices.reverse()  # out of order on purpose: clients must sort by index
        usage = {"prompt_tokens": len(str(seen)), "completion_tokens": 2 * n, "total_tokens": len(str(seen)) + 2 * n}
        kind = "chat.completion" if chat else "text_completion"
        return 200, {"id": f"fake-{serial}", "object": kind, "model": body["model"], "choices": choices, "usage": usage}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        fake: FakeOpenAI = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with fake.lock:
            fake.requests.append({"method": method, "path": self.path, "headers": dict(self.headers), "body": body})
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            action = fake._next_action(body)
        counted = True
        try:
            if fake.delay:
                time.sleep(fake.delay)
            if action is not None and action["kind"] == "hang":
                fake._release.wait(action["seconds"])
                action = None
            if action is not None and action["kind"] == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action is not None:
                status, data, headers = action["status"], action["body"], action["headers"]
            else:
                status, payload = fake.answer(method, self.path, body)
                data, headers = json.dumps(payload).encode(), {}
            # leave the count before answering: the client may send its next request as soon as it reads this one
            with fake.lock:
                fake.in_flight -= 1
            counted = False
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
        finally:
            if counted:
                with fake.lock:
                    fake.in_flight -= 1
