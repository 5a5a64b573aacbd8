"""Choosing the data: DDK's domain mixture and MiniPLM's Difference Sampling on a five-domain corpus.

    python benchmarks/domain_data.py [--only ddk|miniplm] [--steps 120]

* **DDK** (examples/ddk_domains.yaml): one teacher pass writes a top-32 cache of SmolLM2-135M-Instruct
  over the training split; then the 17M student is distilled from it (``sparse_kd`` forward KL) for
  the same budget with uniform domain mixing and with DDK's mixture (updates every 20 steps).
* **MiniPLM** (examples/miniplm_domains.yaml): ``select_data`` trains the small reference LM, scores
  every block with teacher and reference, keeps the best half; the student is then trained by plain
  language modelling for the same budget on the whole corpus and on the refined half.

For each run: the test perplexity on every domain and overall (token-weighted), and for DDK the
domain weights after every update. Results go to ``--out``/domain_data.json (plus the DDK weight
plot) and markdown tables are printed. One seed; the machine is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distill.cache.teacher import build_teacher_cache
from distill.config import load_experiment
from distill.engine.context import environment_summary
from distill.engine.runner import run_experiment
from distill.io import read_jsonl
from distill.selection import select_data


def _rows(run_dir: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((run_dir / "final.json").read_text())["rows"]}


def _initial(config: Path, overrides: list[str]) -> dict[str, float]:
    """Per-domain test perplexity of the student before training (its initial or pretrained weights)."""
    import torch

    from distill.data import load_data
    from distill.engine.batches import derive_seed
    from distill.engine.ddk import domain_losses
    from distill.models.build import build_model

    experiment = load_experiment(config, overrides)
    data = load_data(experiment.data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(experiment.seed, "init", "student"))  # the engine's initialization
        model = build_model(experiment.models["student"], num_classes=data.num_classes, input_shape=data.input_shape)
    names = data.meta["domains"]
    nll = domain_losses(model, data.test, len(names), batch_size=experiment.data.eval_batch_size, device="cpu")
    return {name: float(torch.exp(value.double())) for name, value in zip(names, nll)}


def _run(config: Path, overrides: list[str], label: str) -> dict:
    print(f"training: {label}", flush=True)
    started = time.perf_counter()
    result = run_experiment(load_experiment(config, overrides))
    rows = _rows(result.run_dir)
    student = rows["student"]
    return {
        "run_dir": str(result.run_dir),
        "wall_s": time.perf_counter() - started,
        "test_perplexity": student["test"]["perplexity"],
        "domain_perplexity": student.get("domain_perplexity"),
        "teacher_domain_perplexity": rows.get("teacher", {}).get("domain_perplexity"),
        "teacher_perplexity": rows.get("teacher", {}).get("test", {}).get("perplexity"),
        "mixture": [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if r.get("kind") == "mixture"],
    }


def ddk(out: Path, steps: int | None, overrides: list[str]) -> dict:
    config = ROOT / "examples" / "ddk_domains.yaml"
    cache = out / "caches" / "ddk_domains-k32"
    common = [f"output_dir={out / 'runs'}", *([f"training.max_steps={steps}"] if steps else []), f"cache.path={cache}",
              f"stages.student.teacher={{cache: {cache}, model: teacher}}", *overrides]
    experiment = load_experiment(config, common)
    started = time.perf_counter()
    manifest = build_teacher_cache(experiment, cache, teacher="teacher", k=experiment.cache.k, shard_rows=128)
    result = {"cache_build_s": time.perf_counter() - started, "cache": manifest["stats"], "runs": {},
              "initial": _initial(config, common)}
    for name, extra in (("uniform", ["stages.student.mixture.method=uniform"]), ("ddk", [])):
        result["runs"][name] = _run(config, common + extra, f"DDK example, {name}")
    plot = Path(result["runs"]["ddk"]["run_dir"]) / "plots" / "domain_weights.png"
    if plot.is_file():
        shutil.copy(plot, out / "ddk_domain_weights.png")
    return result


def miniplm(out: Path, steps: int | None, overrides: list[str]) -> dict:
    config = ROOT / "examples" / "miniplm_domains.yaml"
    selection = out / "runs" / "miniplm_selection"
    common = [f"output_dir={out / 'runs'}", *([f"training.max_steps={steps}"] if steps else []), f"select.out={selection}", *overrides]
    started = time.perf_counter()
    summary = select_data(load_experiment(config, common), log=print)
    result = {"select_s": time.perf_counter() - started, "selection": {k: v for k, v in summary.items() if k != "rows"}, "runs": {},
              "initial": _initial(config, common)}
    for name, extra in (("full corpus", []), ("miniplm", [f"data.select={selection}"])):
        result["runs"][name] = _run(config, common + extra, f"MiniPLM example, {name}")
    return result


def print_tables(report: dict) -> None:
    env = report["environment"]
    print(f"\nmachine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}")
    for part in ("ddk", "miniplm"):
        if part not in report:
            continue
        runs = report[part]["runs"]
        first = next(iter(runs.values()))
        domains = list(first["domain_perplexity"])
        print(f"\n{part}: test perplexity per domain")
        print("| model | " + " | ".join(domains) + " | all |")
        print("|---|" + "---|" * (len(domains) + 1))
        initial = report[part].get("initial")
        if initial:
            print("| student before training | " + " | ".join(f"{initial[d]:.1f}" for d in domains) + " | |")
        if first.get("teacher_domain_perplexity"):
            t = first["teacher_domain_perplexity"]
            print("| teacher | " + " | ".join(f"{t[d]:.1f}" for d in domains) + f" | {first['teacher_perplexity']:.1f} |")
        for name, run in runs.items():
            print(f"| {name} | " + " | ".join(f"{run['domain_perplexity'][d]:.1f}" for d in domains) + f" | {run['test_perplexity']:.1f} |")
        if part == "ddk":
            print("\nDDK domain weights after each update")
            print("| step | " + " | ".join(domains) + " |")
            print("|---|" + "---|" * len(domains))
            for record in runs["ddk"]["mixture"]:
                print(f"| {record['step']} | " + " | ".join(f"{record['weights'][d]:.3f}" for d in domains) + " |")
        else:
            shares = report[part]["selection"].get("kept_share_by_domain", {})
            print("\nMiniPLM: share of each domain's blocks kept: " + ", ".join(f"{d} {100 * s:.0f}%" for d, s in shares.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["ddk", "miniplm"])
    parser.add_argument("--steps", type=int, default=None, help="override training.max_steps (default: the example's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "domain_data"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="further config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "domain_data.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["environment"] = environment_summary()
    report["steps"] = args.steps
    for part, function in (("ddk", ddk), ("miniplm", miniplm)):
        if args.only in (None, part):
            report[part] = function(out, args.steps, args.overrides)
            path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print_tables(report)


if __name__ == "__main__":
    main()
