"""The ``distill serve`` command: argument parsing and the serving loop (torch loads lazily).

    distill serve MODEL [--stage S] [--host 127.0.0.1] [--port 8000] [--api-key-env ENV_NAME]
                        [--name NAME] [--max-batch-size 16] [--batch-wait-ms 10] [--max-logprobs 20]
                        [--device cpu] [--trust-remote-code]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_KEY_ENV = "DISTILL_API_KEY"


def _bounded_int(low: int, high: int | None = None) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected an integer between {low} and {high}, got {value}" if high is not None
                                             else f"expected an integer of at least {low}, got {value}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text}")
    return value


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``distill``'s sub-command parsers; returns its parser."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a causal LM (model source or a run's stage) over an OpenAI-compatible HTTP API",
        description="Serve a causal language model over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /stats), decoding concurrent requests in batches.",
    )
    serve.add_argument("model", help="alias, .gguf file, Hugging Face folder, hub id, or a run folder of distill run")
    serve.add_argument("--stage", help="with a run folder: the stage whose student to serve (default: the last finished)")
    serve.add_argument("--gguf-file", help="GGUF file inside a model folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_bounded_int(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key-env", metavar="ENV_NAME",
                       help=f"environment variable holding the API key clients must send (default {DEFAULT_KEY_ENV}; "
                       "unset: no key)")
    serve.add_argument("--name", help="model name clients send (default: the alias, folder name or <run>:<stage>)")
    serve.add_argument("--max-batch-size", type=_bounded_int(1), default=16, help="sequences decoded together (default 16)")
    serve.add_argument("--batch-wait-ms", type=_non_negative_float, default=10.0,
                       help="how long a batch waits to fill, in milliseconds (default 10)")
    serve.add_argument("--max-new-tokens", type=_bounded_int(1), default=1024,
                       help="the most new tokens a request may ask for per sequence (default 1024)")
    serve.add_argument("--max-logprobs", type=_bounded_int(0), default=20,
                       help="the most likely tokens a request may ask for per position (default 20, as OpenAI and "
                       "vLLM; raise it for `distill cache-teacher --endpoint` with k above 20)")
    serve.add_argument("--seed", type=int, default=0, help="seed of the samples of requests that give no seed (default 0)")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    serve.add_argument("--trust-remote-code", action="store_true", help="run model code from the checkpoint (only if you trust it)")
    serve.add_argument("--quiet", action="store_true", help="no access log lines")
    return serve


def api_key_from_env(name: str | None) -> str | None:
    """The API key in environment variable ``name`` (default ``DISTILL_API_KEY``; unset: no key).

    A variable named explicitly must be set: a missing key must not silently open the server.
    """
    variable = name or DEFAULT_KEY_ENV
    value = os.environ.get(variable)
    if value is None or value == "":
        if name is not None and name != DEFAULT_KEY_ENV:
            raise ValueError(f"--api-key-env {name}: the environment variable {name} is not set (or empty)")
        return None
    return value


def command_serve(args: argparse.Namespace, console: Any) -> int:
    """Load the model, serve it until Ctrl-C, and return the exit status (0 on a clean stop)."""
    from rich.markup import escape

    from distill.serve.loading import load_served_model
    from distill.serve.server import TeacherServer, is_loopback

    api_key = api_key_from_env(args.api_key_env)
    console.print(f"loading [cyan]{escape(args.model)}[/cyan] ...", highlight=False)
    model, tokenizer, name = load_served_model(
        args.model, stage=args.stage, gguf_file=args.gguf_file, trust_remote_code=args.trust_remote_code, device=args.device
    )
    name = args.name or name

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    server = TeacherServer(
        model, tokenizer, name=name, host=args.host, port=args.port, api_key=api_key,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_new_tokens_limit=args.max_new_tokens,
        seed=args.seed, log=None if args.quiet else log, max_logprobs=args.max_logprobs,
    )
    if api_key is None and not is_loopback(args.host):
        console.print(
            f"[yellow]warning:[/yellow] serving on {escape(args.host)} without an API key: anyone who can reach this "
            f"port can use the model; set {escape(args.api_key_env or DEFAULT_KEY_ENV)} to require one",
            highlight=False,
        )
    url = server.bind()
    console.print(
        f"serving [cyan]{escape(name)}[/cyan] at {url} (batches of up to {args.max_batch_size}, "
        f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops",
        highlight=False, soft_wrap=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    console.print("stopped", highlight=False)
    return 0
