"""Generation throughput of `distill serve`: the same requests sent one at a time vs concurrently.

    python benchmarks/generation.py [--model smollm2-135m-instruct] [--requests 64] [--max-tokens 24]
                                    [--concurrency 1,4,16] [--max-batch-size 16] [--out benchmarks/results/generation]

The model is served in-process on 127.0.0.1 (a free port) and the black-box client sends
``--requests`` chat requests (arithmetic word problems, each a different prompt, greedy, at most
``--max-tokens`` new tokens, no response cache). With ``--concurrency 1`` every request waits for
the previous one, so the server decodes one sequence at a time; with more, the server batches
the requests that arrive together (at most ``--max-batch-size`` sequences per batch). Reported
per setting: wall time, requests/s, generated tokens/s, the server's mean batch size, and the
speed-up over the serial run. A last row asks for the same prompts as one request each with
``n = 4`` samples (temperature 0.7), i.e. batching within a request. Greedy outputs are checked to
be identical whatever the concurrency. Results go to ``--out``/generation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SYSTEM = "You solve arithmetic problems. Show the calculation, then give the result on a last line as 'Answer: <number>'."


def _messages(index: int) -> list[dict[str, str]]:
    a, b = 2 + index % 8, 1 + (index * 7) % 9
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Kim has {a} marbles and finds {b} more. How many marbles does Kim have now?"},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="n of the last row (samples per request)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation"))
    args = parser.parse_args()

    from distill.blackbox import TeacherClient
    from distill.serve import TeacherServer, load_served_model

    model, tokenizer, name = load_served_model(args.model)
    rows = []
    outputs: dict[int, list[str]] = {}
    with TeacherServer(model, tokenizer, name=name, max_batch_size=args.max_batch_size) as server:
        base = server.url
        warm = TeacherClient.from_url(base, model=name, max_concurrency=1, timeout_s=600)
        warm.chat(_messages(0), max_tokens=4, temperature=0.0, cache=False)

        def measure(concurrency: int, n: int, temperature: float) -> tuple[dict, list[str]]:
            client = TeacherClient.from_url(base, model=name, max_concurrency=concurrency, timeout_s=600)
            before = server.stats()
            requests = [
                dict(messages=_messages(i), n=n, temperature=temperature, max_tokens=args.max_tokens, seed=i, cache=False)
                for i in range(args.requests)
            ]
            started = time.perf_counter()
            responses = client.map("chat", requests)
            wall = time.perf_counter() - started
            after = server.stats()
            sequences = after["sequences"] - before["sequences"]
            tokens = after["generated_tokens"] - before["generated_tokens"]
            batches = after["batches"] - before["batches"]
            texts = [choice["message"]["content"] for r in responses for choice in r["choices"]]
            return {
                "concurrency": concurrency, "n": n, "temperature": temperature, "requests": args.requests,
                "sequences": sequences, "generated_tokens": tokens, "wall_s": round(wall, 3),
                "requests_per_s": round(args.requests / wall, 3), "samples_per_s": round(sequences / wall, 3),
                "tokens_per_s": round(tokens / wall, 2), "mean_batch": round(sequences / max(batches, 1), 2),
            }, texts

        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            row, texts = measure(concurrency, 1, 0.0)
            outputs[concurrency] = texts
            rows.append(row)
            print(f"concurrency {concurrency:>3}: {row['wall_s']:.1f} s, {row['samples_per_s']:.2f} samples/s, "
                  f"{row['tokens_per_s']:.1f} tokens/s, mean batch {row['mean_batch']}", flush=True)
        row, _ = measure(max(int(c) for c in args.concurrency.split(",")), args.samples, 0.7)
        rows.append(row)
        print(f"n={args.samples} per request: {row['wall_s']:.1f} s, {row['samples_per_s']:.2f} samples/s", flush=True)

    serial = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = round(row["samples_per_s"] / serial, 2)
    reference = outputs[min(outputs)]
    identical = all(texts == reference for texts in outputs.values())
    result = {
        "model": name, "max_batch_size": args.max_batch_size, "max_tokens": args.max_tokens, "rows": rows,
        "greedy_outputs_identical": identical,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print("| concurrency | samples per request | wall (s) | samples/s | tokens/s | mean batch | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['n']} | {row['wall_s']:.1f} | {row['samples_per_s']:.2f} | "
              f"{row['tokens_per_s']:.1f} | {row['mean_batch']:.1f} | {row['speedup']:.2f}x |")
    print(f"\ngreedy outputs identical across concurrency: {identical}")


if __name__ == "__main__":
    main()
