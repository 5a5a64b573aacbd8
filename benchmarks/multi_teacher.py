"""Several teachers per step: run live, or precomputed once (examples/multi_teacher_fashion.yaml).

    python benchmarks/multi_teacher.py [--steps 40] [--batch-size 128] [--threads 2] [--rows 10000] [--out benchmarks/results/multi_teacher]

The three teachers of the multi-teacher example (ResNet-20, the ViT, the MLP; seeded initial
weights: speed does not depend on what they learned) and its half-width ResNet-8 student, on
Fashion-MNIST batches of ``--batch-size`` 28x28 images. For each way of providing the teachers,
the median time of one training step (teachers' logits + ``multi_teacher_kd`` + the student's
forward and backward + an SGD step) over ``--steps`` steps, after 3 warm-up steps:

* ``live``: the stage's `TeacherEnsemble` runs every teacher on every batch;
* ``precompute``: `PrecomputedTeachers` runs each teacher once over the 10,000 training images
  before training (its one-off time is reported separately) and steps read the logits by row.

Also the peak number of teacher parameters held while the student trains. Results go to
``--out``/multi_teacher.json and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.config.schema import ModelSpec  # noqa: E402
from distill.engine.teachers import TeacherEnsemble  # noqa: E402
from distill.losses import multi_teacher_kd  # noqa: E402
from distill.models.build import build_model  # noqa: E402

TEACHERS = {
    "resnet20": ModelSpec(arch="resnet20"),
    "vit": ModelSpec(arch="vit", params={"patch_size": 4, "dim": 48, "depth": 4, "heads": 3, "mlp_ratio": 2.0}),
    "mlp": ModelSpec(arch="mlp", params={"hidden": [512, 256]}),
}
STUDENT = ModelSpec(arch="resnet8", params={"width": 0.5})
SHAPE, CLASSES = (1, 28, 28), 10


def build(spec: ModelSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(spec, num_classes=CLASSES, input_shape=SHAPE)


def time_steps(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000, help="training images the precomputation covers (the example's 10,000)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_teacher"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows_count = args.rows
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(rows_count, *SHAPE, generator=generator)
    teachers = [build(spec, i).eval().requires_grad_(False) for i, spec in enumerate(TEACHERS.values())]
    ensemble = TeacherEnsemble(teachers, names=list(TEACHERS), weights=[1, 1, 1], temperatures=[1, 1, 1])
    teacher_params = sum(p.numel() for t in teachers for p in t.parameters())

    def trainer():
        student = build(STUDENT, 10)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        position = {"i": 0}

        def rows() -> torch.Tensor:
            start = position["i"] * args.batch_size % (rows_count - args.batch_size)
            position["i"] += 1
            return torch.arange(start, start + args.batch_size)

        return student, optimizer, rows

    results = {}
    # live: every teacher on every batch
    student, optimizer, rows = trainer()

    def live_step() -> None:
        index = rows()
        x = images[index]
        stacked = ensemble.all_logits(x)
        loss = multi_teacher_kd(student(x), stacked, ensemble.weights.expand(len(index), -1), temperature=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    results["live"] = {"step_s": time_steps(live_step, args.steps), "teacher_params_in_memory": teacher_params}
    # precompute: each teacher once over the training images, then steps read rows
    start = time.perf_counter()
    with torch.no_grad():
        cached = torch.stack(
            [torch.cat([t(images[i : i + 1000]) for i in range(0, rows_count, 1000)]) for t in teachers], dim=1
        )
    one_off = time.perf_counter() - start
    student, optimizer, rows = trainer()

    def cached_step() -> None:
        index = rows()
        loss = multi_teacher_kd(student(images[index]), cached[index], ensemble.weights.expand(len(index), -1), temperature=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    results["precompute"] = {"step_s": time_steps(cached_step, args.steps), "one_off_s": one_off, "teacher_params_in_memory": 0}
    environment = {"torch": torch.__version__, "threads": args.threads, "batch_size": args.batch_size, "steps": args.steps, "rows": rows_count}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_teacher.json").write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    live = results["live"]["step_s"]
    print(f"3 teachers ({teacher_params:,} parameters), batch {args.batch_size}, {args.threads} threads, median of {args.steps} steps")
    print("| teachers | time per step (ms) | vs live | one-off (s) | teacher parameters held while training |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        one = f"{r['one_off_s']:.1f}" if "one_off_s" in r else "-"
        print(f"| {name} | {1000 * r['step_s']:.1f} | {r['step_s'] / live:.2f}x | {one} | {r['teacher_params_in_memory']:,} |")


if __name__ == "__main__":
    main()
