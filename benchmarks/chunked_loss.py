"""Forward + backward time and peak memory of token-level distillation losses at LM shapes.

    python benchmarks/chunked_loss.py [--shapes 8192x576x49152,4096x896x151936] [--repeats 2] [--rounds 1]

Cases, each in a fresh process (so peak memory is the case's own), all float32 unless noted:

- ``floor``: the four bare matmuls every exact method needs (student and teacher logits, the
  gradients of the student's hidden states and lm_head weight), no loss at all, on the full logits;
- ``floor_chunked``: the same four matmuls in chunks of the rows :func:`fused_linear_distill`
  uses by default, into buffers reused by every chunk (the floor of any chunked method);
- ``naive_kl``: full logits, ``forward_kl`` and autograd;
- ``trl_jsd``: TRL's ``GKDTrainer.generalized_jsd_loss`` (beta 0.5) on full logits;
- ``liger_jsd_compiled`` / ``liger_jsd_eager``: Liger-Kernel's ``LigerFusedLinearJSDLoss``
  (beta 0.5, soft loss only, its default chunk of 1024 rows);
- ``ours_jsd`` / ``ours_kl`` (eager) and ``ours_jsd_compiled`` / ``ours_kl_compiled``:
  :func:`distill.losses.fused_linear_distill` with ``generalized_jsd`` (beta 0.5) / ``forward_kl``;
- ``ours_jsd_bf16_compiled``: the same on bfloat16 weights and hidden states (float32 loss),
  with its relative error against float32.

Time is the median of ``--repeats`` runs after one warm-up run (which also compiles); with
``--rounds N`` the whole list of cases runs N times, interleaved (on a shared machine a burst of
other work then lands on different cases in different rounds), and the median is over all the
timed runs of a case. The load average before each case is recorded. Memory is the peak resident
set size during the timed runs minus the resident size with the inputs allocated (the peak is
reset through ``/proc/self/clear_refs`` after the warm-up). A case that runs out of its memory
limit (``--memory-limit-gb``, address space) is reported as such. Prints a table with ratios to
``liger_jsd_compiled`` and to ``floor`` (both measured in the same run) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = (
    "floor",
    "floor_chunked",
    "naive_kl",
    "trl_jsd",
    "liger_jsd_compiled",
    "liger_jsd_eager",
    "ours_kl",
    "ours_jsd",
    "ours_kl_compiled",
    "ours_jsd_compiled",
    "ours_jsd_bf16_compiled",
)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_case(case: str, tokens: int, hidden: int, vocab: int, repeats: int) -> dict:
    """Runs in the child process: build inputs, warm up, time, measure."""
    import torch

    from distill.losses import forward_kl, fused_linear_distill
    from distill.losses.chunked import default_chunk_rows

    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    student_hidden = torch.randn(tokens, hidden, dtype=dtype).requires_grad_(True)
    student_weight = (torch.randn(vocab, hidden) * hidden**-0.5).to(dtype).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, hidden, dtype=dtype)
    teacher_weight = (torch.randn(vocab, hidden) * hidden**-0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))

    def step() -> float:
        student_hidden.grad = None
        student_weight.grad = None
        if case == "floor":
            with torch.no_grad():
                logits = student_hidden @ student_weight.t()
                teacher_hidden @ teacher_weight.t()
                logits @ student_weight
                logits.t() @ student_hidden
            return 0.0
        if case == "floor_chunked":
            rows = default_chunk_rows(vocab, tokens)
            with torch.no_grad():
                student_logits, teacher_logits = torch.empty(rows, vocab), torch.empty(rows, vocab)
                grad_hidden, grad_weight = torch.empty(tokens, hidden), torch.zeros(vocab, hidden)
                for start in range(0, tokens, rows):
                    chunk = student_hidden[start : start + rows]
                    size = chunk.shape[0]
                    torch.mm(chunk, student_weight.t(), out=student_logits[:size])
                    torch.mm(teacher_hidden[start : start + rows], teacher_weight.t(), out=teacher_logits[:size])
                    torch.mm(student_logits[:size], student_weight, out=grad_hidden[start : start + rows])
                    grad_weight.addmm_(student_logits[:size].t(), chunk)
            return 0.0
        if case == "naive_kl":
            loss = forward_kl(student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t())
        elif case == "trl_jsd":
            try:
                from trl.experimental.gkd import GKDTrainer
            except ImportError:
                from trl import GKDTrainer  # older TRL

            loss = GKDTrainer.generalized_jsd_loss(
                student_hidden @ student_weight.t(), teacher_hidden @ teacher_weight.t(), beta=0.5
            )
        elif case.startswith("liger"):
            from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

            module = LigerFusedLinearJSDLoss(
                weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=case.endswith("compiled")
            )
            loss = module(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
        else:
            divergence = "forward_kl" if "_kl" in case else "generalized_jsd"
            loss = fused_linear_distill(
                student_hidden, student_weight, teacher_hidden, teacher_weight,
                divergence=divergence, params={"beta": 0.5} if divergence == "generalized_jsd" else {},
                compile=case.endswith("compiled"),
            )
        loss.backward()
        return float(loss.detach())

    baseline_kb = _rss_kb("VmRSS")
    warm_start = time.perf_counter()
    value = step()
    warm_up_s = time.perf_counter() - warm_start
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    resident_kb = _rss_kb("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_kb = _rss_kb("VmHWM")
    result = {
        "case": case, "seconds": statistics.median(times), "times": times, "warm_up_s": warm_up_s,
        "peak_extra_gb": max(peak_kb - min(baseline_kb, resident_kb), 0) / 1024**2, "value": value,
    }
    if case == "ours_jsd_bf16_compiled":
        reference = fused_linear_distill(
            student_hidden.float(), student_weight.float(), teacher_hidden.float(), teacher_weight.float(),
            divergence="generalized_jsd", params={"beta": 0.5},
        )
        result["relative_error_vs_float32"] = abs(value - float(reference)) / abs(float(reference))
    return result


def _merge_rounds(case: str, runs: list[dict]) -> dict:
    """One row per case from its rounds: the median over all timed runs, the largest peak."""
    timed = [run for run in runs if "seconds" in run]
    if not timed:
        return {**runs[0], "load_before": [run["load_before"] for run in runs]}
    times = [t for run in timed for t in run["times"]]
    row = {**timed[0], "seconds": statistics.median(times), "times": times, "min_seconds": min(times)}
    row["peak_extra_gb"] = max(run["peak_extra_gb"] for run in timed)
    row["warm_up_s"] = [run["warm_up_s"] for run in timed]
    row["load_before"] = [run["load_before"] for run in runs]
    if len(timed) < len(runs):
        row["failed_rounds"] = [run["error"] for run in runs if "error" in run]
    return row


def amx_available() -> bool:
    try:
        return "amx" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8192x576x49152,4096x896x151936", help="tokens x hidden x vocab, comma-separated")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="run the list of cases this many times, interleaved")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="address-space limit of each case's process")
    parser.add_argument("--out", default="benchmarks/results/chunked_loss.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # tokens,hidden,vocab,case
        tokens, hidden, vocab, case = args.child.split(",")
        limit = int(args.memory_limit_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            print(json.dumps(run_case(case, int(tokens), int(hidden), int(vocab), args.repeats)))
        except (MemoryError, RuntimeError) as error:
            if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
                raise
            print(json.dumps({"case": case, "error": f"out of memory (limit {args.memory_limit_gb:g} GB)"}))
        return

    from distill.engine.context import cpu_name

    results = []
    for shape in args.shapes.split(","):
        tokens, hidden, vocab = (int(x) for x in shape.split("x"))
        runs: dict[str, list[dict]] = {case: [] for case in args.cases.split(",")}
        for round_index in range(args.rounds):
            for case, case_runs in runs.items():
                command = [sys.executable, __file__, "--child", f"{tokens},{hidden},{vocab},{case}",
                           "--repeats", str(args.repeats), "--memory-limit-gb", str(args.memory_limit_gb)]
                load = os.getloadavg()[0]
                completed = subprocess.run(command, capture_output=True, text=True, check=False)
                lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
                if completed.returncode != 0 or not lines:
                    tail = (completed.stderr or "").strip().splitlines()[-1:] or ["no output"]
                    killed = completed.returncode < 0 or "MemoryError" in completed.stderr or "alloc" in completed.stderr
                    row = {"case": case, "error": "out of memory" if killed else f"failed: {tail[0][:160]}"}
                else:
                    row = json.loads(lines[-1])
                row["load_before"] = load
                case_runs.append(row)
                shown = f"{row['seconds']:.2f} s, +{row['peak_extra_gb']:.2f} GB" if "seconds" in row else row["error"]
                print(f"  [{shape}] round {round_index + 1}: {case}: {shown} (load average {load:.2f})", flush=True)
        rows = [_merge_rounds(case, case_runs) for case, case_runs in runs.items()]
        timed = {row["case"]: row for row in rows if "seconds" in row}
        for row in rows:
            if "seconds" not in row:
                continue
            if "liger_jsd_compiled" in timed:
                row["vs_liger_compiled"] = row["seconds"] / timed["liger_jsd_compiled"]["seconds"]
            if "floor" in timed:
                row["vs_floor"] = row["seconds"] / timed["floor"]["seconds"]
            if "floor_chunked" in timed:
                row["vs_floor_chunked"] = row["seconds"] / timed["floor_chunked"]["seconds"]
        results.append({"tokens": tokens, "hidden": hidden, "vocab": vocab, "rows": rows})

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "amx": amx_available(), "python": platform.python_version()}
    import torch

    machine["torch"] = torch.__version__
    machine["threads"] = torch.get_num_threads()
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, AMX: {'yes' if machine['amx'] else 'no'}, torch {machine['torch']}")
    for shape in results:
        print(f"\ntokens {shape['tokens']}, hidden {shape['hidden']}, vocab {shape['vocab']} (float32 unless noted)")
        print(f"{'case':<24}{'seconds':>9}{'min':>8}{'peak +GB':>10}{'vs Liger compiled':>19}{'vs floor':>10}{'vs chunked floor':>18}")
        for row in shape["rows"]:
            if "seconds" not in row:
                print(f"{row['case']:<24}{row['error']:>56}")
                continue
            ratios = [f"{row[key]:.2f}x" if key in row else "-" for key in ("vs_liger_compiled", "vs_floor", "vs_floor_chunked")]
            extra = f"  (error vs float32: {row['relative_error_vs_float32']:.1e})" if "relative_error_vs_float32" in row else ""
            print(f"{row['case']:<24}{row['seconds']:>9.2f}{row['min_seconds']:>8.2f}{row['peak_extra_gb']:>10.2f}"
                  f"{ratios[0]:>19}{ratios[1]:>10}{ratios[2]:>18}{extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from distill.io import atomic_write_json

    atomic_write_json(out, {"machine": machine, "repeats": args.repeats, "rounds": args.rounds, "shapes": results})
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
