"""The teacher-data example end to end: generate and filter, then SFT -> REDI -> KDRL.

    python benchmarks/teacher_data.py [--limit N] [--out benchmarks/results/teacher_data]

1. **Generation** (``examples/teacher_data/generate.yaml``): SmolLM2-135M-Instruct, served
   in-process by ``distill serve``, writes 3 samples for each of 400 arithmetic word problems;
   the filters keep formatted, right, non-duplicate samples; right/wrong pairs go to REDI. The
   responses are cached, so a rerun asks the teacher nothing.
2. **Filters without a rule**: the same samples (from the response cache) filtered by
   self-consistency (majority answer over a problem's samples, share >= 0.5) instead of the
   answer check, to measure how precise the label-free filter is (share of kept samples that are
   right, measured with the rule).
3. **Training** (``examples/teacher_data/student.yaml``): a student keeping 6 of the teacher's
   30 layers, SFT on the kept rationales, then REDI on the pairs, then KDRL; every model's greedy
   answers on 200 held-out problems (``answer_accuracy``).

The numbers come from one run on one machine; results go to ``--out``/teacher_data.json and a
markdown summary is printed. Generation throughput (serial vs batched) is
``benchmarks/generation.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GENERATE = ROOT / "examples" / "teacher_data" / "generate.yaml"
STUDENT = ROOT / "examples" / "teacher_data" / "student.yaml"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems (a quick try)")
    parser.add_argument("--student-overrides", nargs="*", default=[], help="--set style overrides of the student experiment")
    parser.add_argument("--reuse", action="append", default=[], metavar="FOLDER",
                        help="copy finished stages identical to the experiment's from these run folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_data"))
    args = parser.parse_args()

    from distill.config import load_experiment
    from distill.engine.runner import run_experiment
    from distill.synth import load_generate_spec, run_pipeline

    started = time.time()
    overrides: dict = {"limit": args.limit} if args.limit else {}
    spec = load_generate_spec(GENERATE, overrides)
    generated = run_pipeline(spec, log=print)
    stats = generated.stats

    # every sample the teacher wrote: the kept ones and the rejected ones
    kept = _lines(Path(spec.output))
    rejected = _lines(Path(spec.rejected_output))
    samples = kept + rejected
    right = sum(bool(s.get("correct")) for s in samples)
    by_problem: dict[str, list[dict]] = {}
    for sample in samples:
        by_problem.setdefault(sample["prompt_id"], []).append(sample)
    majority_right = 0
    for group in by_problem.values():
        answers = Counter(s["answer"] for s in group if s.get("answer") is not None)
        if answers:
            answer, _ = answers.most_common(1)[0]
            majority_right += answer == group[0]["reference"]
    teacher = {
        "samples": len(samples),
        "problems": len(by_problem),
        "sample_accuracy": right / max(len(samples), 1),
        "majority_vote_accuracy": majority_right / max(len(by_problem), 1),
        "pass_at_n": sum(any(s.get("correct") for s in g) for g in by_problem.values()) / max(len(by_problem), 1),
    }

    # the same samples filtered without the rule: self-consistency
    folder = Path(spec.output).parent / "self_consistency"
    sc_spec = load_generate_spec(GENERATE, {
        **overrides,
        "output": str(folder / "rationales.jsonl"),
        "rejected_output": str(folder / "rejected.jsonl"),
        "pairs.output": str(folder / "pairs.jsonl"),
        "source.task.holdout": None,
        "filters": [
            {"type": "format", "must_match": r"Answer:\s*-?\d"},
            {"type": "length", "min": 8, "max": 200},
            {"type": "self_consistency", "min_agreement": 0.5},
            "exact_dedup",
            {"type": "near_dedup", "threshold": 0.9},
        ],
    })
    sc = run_pipeline(sc_spec, log=print, overwrite=True)
    sc_kept = _lines(Path(sc_spec.output))
    self_consistency = {
        "kept": len(sc_kept),
        "yield": sc.stats["yield"],
        "precision": sum(r["answer"] == r["reference"] for r in sc_kept) / max(len(sc_kept), 1),
        "filters": sc.stats["filters"],
    }
    rule_precision = sum(r["answer"] == r["reference"] for r in kept) / max(len(kept), 1)

    # the student: SFT -> REDI -> KDRL
    experiment = load_experiment(STUDENT, overrides=args.student_overrides)
    result = run_experiment(experiment, reuse_dirs=args.reuse)
    rows = []
    for row in result.rows:
        test = row["test"]
        rows.append({
            "name": row["name"], "params": row["params"], "answer_accuracy": test.get("answer_accuracy"),
            "answer_format": test.get("answer_format"), "perplexity": test.get("perplexity"),
            "kl_to_teacher": test.get("kl_to_teacher"),
        })
    rollouts = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rollouts if r.get("kind") == "rollout"]

    out = {
        "generation": {
            "filters": stats["filters"], "samples": stats["samples"], "kept": stats["kept"], "yield": stats["yield"],
            "pairs": stats["pairs"], "samples_per_s": stats.get("samples_per_s"), "wall_time_s": stats.get("wall_time_s"),
            "precision": rule_precision,
        },
        "teacher": teacher,
        "self_consistency": self_consistency,
        "student": rows,
        "kdrl_reward": {"first_5": sum(rewards[:5]) / max(len(rewards[:5]), 1), "last_5": sum(rewards[-5:]) / max(len(rewards[-5:]), 1),
                        "steps": len(rewards)},
        "run_dir": str(result.run_dir),
        "wall_time_s": round(time.time() - started, 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "teacher_data.json").write_text(json.dumps(out, indent=2) + "\n")

    print("\n| filter | in | out | yield |\n|---|---|---|---|")
    for f in stats["filters"]:
        print(f"| {f['name']} | {f['in']} | {f['out']} | {100 * f['yield']:.1f}% |")
    print(f"| overall | {stats['samples']} | {stats['kept']} | {100 * stats['yield']:.1f}% |")
    print(f"\nteacher: sample accuracy {100 * teacher['sample_accuracy']:.1f}%, majority vote "
          f"{100 * teacher['majority_vote_accuracy']:.1f}%, pass@n {100 * teacher['pass_at_n']:.1f}% over {teacher['problems']} problems")
    print(f"self-consistency instead of the rule: kept {self_consistency['kept']}, "
          f"precision {100 * self_consistency['precision']:.1f}% (rule-filtered: {100 * rule_precision:.1f}%)")
    print("\n| model | params | answer accuracy | answer format | test perplexity |\n|---|---|---|---|---|")
    for row in rows:
        accuracy = row["answer_accuracy"]
        print(f"| {row['name']} | {row['params']:,} | {100 * accuracy:.1f}% | {100 * row['answer_format']:.1f}% | "
              f"{row['perplexity']:.3f} |" if accuracy is not None else f"| {row['name']} | - | - | - | - |")
    print(f"\nKDRL mean reward: first 5 steps {out['kdrl_reward']['first_5']:.3f}, last 5 {out['kdrl_reward']['last_5']:.3f}")


if __name__ == "__main__":
    main()
