"""Does the training-free DisWOT score rank students like real distillation does?

    python benchmarks/diswot.py [--epochs 12] [--teacher-epochs 12] [--work /tmp/diswot-bench]
                                [--out benchmarks/results/diswot/diswot.json]

On scikit-learn's digits: trains one teacher (ResNet-8, width 1) with the project's engine, scores
every candidate student at random initialization (`distill.search.score_students`, 2 minibatches
of 64 training images), then distills every candidate for real from that teacher (0.5 CE + 0.5
Hinton KD, T=4, the same schedule for all) and reports the Spearman rank correlation between each
score and the distilled students' test accuracy, next to the correlation of the parameter count
(a trivial training-free baseline). Also reports the search's wall time against the training
time it would save. Prints a table and writes the figures as JSON. Nothing is tuned to the result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from scipy.stats import spearmanr

from distill.config import load_experiment
from distill.config.schema import ModelSpec, SearchSpec
from distill.data import load_data
from distill.engine.context import cpu_name
from distill.engine.runner import run_experiment
from distill.models.build import build_model, load_weights
from distill.search import score_students

CANDIDATES: dict[str, dict[str, Any]] = {
    "mlp-16": {"arch": "mlp", "params": {"hidden": [16]}},
    "mlp-64x64": {"arch": "mlp", "params": {"hidden": [64, 64]}},
    "resnet8-w0.25": {"arch": "resnet_cifar", "params": {"depth": 8, "width": 0.25}},
    "resnet8-w0.5": {"arch": "resnet_cifar", "params": {"depth": 8, "width": 0.5}},
    "resnet14-w0.25": {"arch": "resnet_cifar", "params": {"depth": 14, "width": 0.25}},
    "resnet14-w0.5": {"arch": "resnet_cifar", "params": {"depth": 14, "width": 0.5}},
    "resnet20-w0.25": {"arch": "resnet_cifar", "params": {"depth": 20, "width": 0.25}},
    "resnet20-w0.5": {"arch": "resnet_cifar", "params": {"depth": 20, "width": 0.5}},
}
TEACHER = {"arch": "resnet_cifar", "params": {"depth": 8, "width": 1.0}}


def experiment_dict(work: Path, epochs: int, teacher_epochs: int, students: list[str]) -> dict[str, Any]:
    kd_terms = [
        {"name": "labels", "loss": "cross_entropy", "weight": 0.5},
        {"name": "kd", "loss": "hinton_kd", "weight": 0.5, "params": {"temperature": 4.0}},
    ]
    return {
        "name": "diswot_bench",
        "seed": 0,
        "output_dir": str(work),
        "device": "cpu",
        "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.15, "test_fraction": 0.25},
        "models": {"teacher": TEACHER, **{name: CANDIDATES[name] for name in students}},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0005},
        "scheduler": {"name": "cosine", "warmup_steps": 20},
        "training": {"epochs": epochs},
        "evaluation": {"latency": False, "every_epochs": 100},
        "stages": [{"name": "teacher", "model": "teacher", "epochs": teacher_epochs, "objective": {"terms": [{"loss": "cross_entropy"}]}}]
        + [{"name": f"kd-{name}", "model": name, "teacher": "teacher", "objective": {"terms": kd_terms}} for name in students],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12, help="distillation epochs of every student")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--num-batches", type=int, default=2)
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of the candidates")
    parser.add_argument("--work", default="/tmp/diswot-bench", help="run folders go here")
    parser.add_argument("--out", default="benchmarks/results/diswot/diswot.json")
    args = parser.parse_args()
    students = [name for name in args.candidates.split(",") if name]
    work = Path(args.work)

    # 1. the teacher, trained once
    teacher_only = experiment_dict(work, args.epochs, args.teacher_epochs, students)
    teacher_only["stages"] = teacher_only["stages"][:1]
    started = time.perf_counter()
    teacher_run = run_experiment(load_experiment(teacher_only), write_report=False)
    teacher_time = time.perf_counter() - started
    teacher_acc = teacher_run.rows[0]["test"]["accuracy"]
    print(f"teacher: test acc {100 * teacher_acc:.2f}% in {teacher_time:.1f} s")

    # 2. the training-free search
    experiment = load_experiment(experiment_dict(work, args.epochs, args.teacher_epochs, students))
    started = time.perf_counter()
    data = load_data(experiment.data)
    teacher = build_model(experiment.models["teacher"], num_classes=data.num_classes, input_shape=data.input_shape)
    load_weights(teacher, teacher_run.run_dir / "stages" / "teacher" / "model.safetensors")
    spec = SearchSpec(
        teacher="teacher", candidates={name: ModelSpec(**CANDIDATES[name]) for name in students},
        batch_size=64, num_batches=args.num_batches, seed=0,
    )
    scored = {row.name: row for row in score_students(teacher, spec.candidates, data, spec)}
    search_time = time.perf_counter() - started
    print(f"search: {len(scored)} students scored in {search_time:.2f} s (data loading and teacher included)")

    # 3. every student distilled for real (the teacher stage is reused, not retrained)
    started = time.perf_counter()
    result = run_experiment(experiment, reuse_dirs=[teacher_run.run_dir], write_report=False)
    distill_time = time.perf_counter() - started
    rows = {row["name"]: row for row in result.rows}

    table = []
    for name in students:
        row = rows[f"kd-{name}"]
        score = scored[name]
        table.append(
            {
                "student": name, "params": score.num_params, "semantic": score.semantic, "relation": score.relation,
                "total": score.total, "rank_by_score": score.rank, "test_accuracy": row["test"]["accuracy"],
                "train_time_s": row.get("train_time_s"),
            }
        )
    accuracy = [r["test_accuracy"] for r in table]
    correlations = {}
    for key in ("total", "semantic", "relation", "params"):
        rho, p_value = spearmanr([r[key] for r in table], accuracy)
        correlations[key] = {"rho": float(rho), "p_value": float(p_value)}
    by_accuracy = sorted(table, key=lambda r: -r["test_accuracy"])
    for index, r in enumerate(by_accuracy):
        r["rank_by_accuracy"] = index + 1
    training_s = sum(r["train_time_s"] or 0.0 for r in table)

    print(f"\n{'student':16} {'params':>8} {'semantic':>9} {'relation':>9} {'total':>8} {'score rank':>10} {'test acc':>9} {'acc rank':>8} {'train s':>8}")
    for r in sorted(table, key=lambda r: r["rank_by_score"]):
        print(
            f"{r['student']:16} {r['params']:>8,} {r['semantic']:>9.4f} {r['relation']:>9.4f} {r['total']:>8.4f} "
            f"{r['rank_by_score']:>10} {100 * r['test_accuracy']:>8.2f}% {r['rank_by_accuracy']:>8} {r['train_time_s']:>8.1f}"
        )
    for key, value in correlations.items():
        print(f"Spearman rho(score={key}, distilled test acc) = {value['rho']:+.3f} (p = {value['p_value']:.3f})")
    print(f"search wall time {search_time:.2f} s vs {training_s:.1f} s of distillation training ({distill_time:.1f} s wall with evaluation)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": cpu_name(),
                "dataset": "digits",
                "teacher": {**TEACHER, "test_accuracy": teacher_acc, "train_wall_s": teacher_time},
                "distillation": {"epochs": args.epochs, "objective": "0.5 CE + 0.5 Hinton KD (T=4)", "seed": 0},
                "search": {"batch_size": 64, "num_batches": args.num_batches, "wall_s": search_time},
                "students": table,
                "spearman": correlations,
                "distillation_train_time_s": training_s,
                "distillation_wall_s": distill_time,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
