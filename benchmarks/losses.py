"""Forward + backward time of every registered logit loss, as a ratio to plain forward KL.

    python benchmarks/losses.py [--rows 4096] [--classes 32000] [--repeats 5] [--out benchmarks/results/losses.json]

Every loss runs on the same float32 logits [rows, classes] (plus labels, and features for losses
that read them); each case is timed as the median of ``--repeats`` runs after one warm-up round, all in one
process, round-robin (every round times every loss once), so the ratios are comparable even on
a noisy shared machine.
Losses that couple every pair of rows of the batch (SinKD's batch-wise Sinkhorn: an
``rows x rows`` cost matrix of L1 distances over the classes, O(rows^2 * classes)) are timed at
``--coupled-rows`` rows and also reported scaled by ``(rows / coupled_rows)^2`` to the full
shape, labelled as such. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distill.engine.context import cpu_name
from distill.objective import DEFAULT_SOURCES, Objective, Term, tensor_arguments
from distill.registry import LOSSES, load_builtins

FEATURE_DIM = 256
BATCH_COUPLED = {"sinkhorn"}


def make_sources(rows: int, classes: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "student.logits": torch.randn(rows, classes, generator=generator) * 3,
        "teacher.logits": torch.randn(rows, classes, generator=generator) * 3,
        "batch.labels": torch.randint(0, classes, (rows,), generator=generator),
        "student.features": torch.randn(rows, FEATURE_DIM, generator=generator),
        "teacher.features": torch.randn(rows, FEATURE_DIM, generator=generator),
    }


def build_case(name: str, sources: dict[str, torch.Tensor], classes: int) -> Objective | None:
    """An objective holding just this loss, or None when it does not apply to class logits."""
    loss = LOSSES.get(name).builder
    required, _ = tensor_arguments(loss)
    needed = [DEFAULT_SOURCES.get(argument) for argument in required]
    if any(source is None or source not in sources for source in needed):
        return None
    if "student.logits" not in needed:  # a feature or relation loss: not a logit loss
        return None
    if name in ("margin_mse", "dckd", "adpa", "redi", "qcrd"):  # pairs of scores / of responses, not class logits
        return None
    if name in ("kdrl", "grpo"):  # token rows of sampled completions with their advantages
        return None
    shapes = {source: tuple(tensor.shape[1:]) for source, tensor in sources.items()}
    return Objective([Term(name, name)], num_classes=classes, source_shapes=shapes)


def time_once(objective: Objective, sources: dict[str, torch.Tensor]) -> float:
    inputs = dict(sources)
    inputs["student.logits"] = sources["student.logits"].clone().requires_grad_(True)
    inputs["student.features"] = sources["student.features"].clone().requires_grad_(True)
    start = time.perf_counter()
    objective(inputs).total.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--coupled-rows", type=int, default=512, help="rows for batch-coupled losses (sinkhorn)")
    parser.add_argument("--out", default="benchmarks/results/losses.json")
    args = parser.parse_args()
    load_builtins()
    sources = make_sources(args.rows, args.classes, torch.Generator().manual_seed(0))
    coupled_sources = {name: tensor[: args.coupled_rows] for name, tensor in sources.items()}
    scale = (args.rows / args.coupled_rows) ** 2
    cases: dict[str, tuple[Objective, dict[str, torch.Tensor], bool]] = {}
    for entry in LOSSES:
        coupled = entry.name in BATCH_COUPLED
        case_sources = coupled_sources if coupled else sources
        objective = build_case(entry.name, case_sources, args.classes)
        if objective is not None:
            cases[entry.name] = (objective, case_sources, coupled)
    # Round-robin: every repeat times every loss once, so a slow spell of the machine hits all
    # of them alike instead of one; the first round is a warm-up.
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats + 1):
        for name, (objective, case_sources, _) in cases.items():
            elapsed = time_once(objective, case_sources)
            if repeat:
                times[name].append(elapsed)
    results = {
        name: statistics.median(times[name]) * (scale if coupled else 1.0) for name, (_, _, coupled) in cases.items()
    }
    measured_at = {name: args.coupled_rows if coupled else args.rows for name, (_, _, coupled) in cases.items()}
    baseline = results["forward_kl"]
    print(f"forward + backward at [{args.rows}, {args.classes}] float32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'loss':<24}{'seconds':>10}{'vs forward_kl':>16}  note")
    for name, seconds in sorted(results.items(), key=lambda item: item[1]):
        note = ""
        if measured_at[name] != args.rows:
            note = f"measured at {measured_at[name]} rows ({seconds / scale:.3f} s), scaled by (rows ratio)^2"
        print(f"{name:<24}{seconds:>10.3f}{seconds / baseline:>15.2f}x  {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "shape": [args.rows, args.classes],
        "threads": torch.get_num_threads(),
        "machine": cpu_name(),
        "torch": torch.__version__,
        "seconds": results,
        "measured_at_rows": measured_at,
        "ratio_to_forward_kl": {name: seconds / baseline for name, seconds in results.items()},
    }, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
