"""``distill compare``: named variants of one experiment over several seeds, in one table.

A comparison folder ``<output_dir>/<name>/compare-<timestamp>/`` holds one run folder per
variant and seed (``<variant>/seed-<seed>/``), ``compare.json`` with every figure, and the
table ``compare.md`` with its plot ``compare.png``. Every variant's configuration is validated
before the first run starts. Stages that are identical across variants of one seed (typically
the teacher) are trained once and reused. An interrupted comparison continues with ``resume``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from distill.config.loader import ConfigError, KeyPath, apply_mapping_overrides, experiment_from_dict
from distill.config.schema import Experiment
from distill.engine.callbacks import Callback
from distill.io import atomic_write_json


@dataclass
class ComparePlan:
    folder: Path
    runs: list[tuple[str, int, Experiment, Path]]
    experiment: Experiment


def plan_compare(
    raw: dict[str, Any],
    lines: dict[KeyPath, int | str] | None = None,
    source: str | None = None,
    *,
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
    folder: Path | None = None,
) -> ComparePlan:
    """Validate every (variant, seed) configuration and lay out their run folders."""
    base = experiment_from_dict(raw, lines, source)
    chosen_seeds = seeds if seeds is not None else base.compare.seeds
    all_variants = base.compare.variants or {"default": {}}
    if variants:
        unknown = [v for v in variants if v not in all_variants]
        if unknown:
            raise ConfigError([f"compare.variants has no variant {', '.join(unknown)}; defined: {', '.join(all_variants)}"], source)
        all_variants = {name: all_variants[name] for name in variants}
    if folder is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(base.output_dir) / base.name / f"compare-{stamp}"
    runs: list[tuple[str, int, Experiment, Path]] = []
    problems: list[str] = []
    for variant, overrides in all_variants.items():
        for seed in chosen_seeds:
            try:
                data = apply_mapping_overrides(raw, {**overrides, "seed": seed})
                experiment = experiment_from_dict(data, None, source)
            except ConfigError as error:
                problems += [f"variant '{variant}': {p}" for p in error.problems]
                break
            except ValueError as error:
                problems.append(f"variant '{variant}': {error}")
                break
            runs.append((variant, seed, experiment, folder / variant / f"seed-{seed}"))
    if problems:
        raise ConfigError(problems, source)
    return ComparePlan(folder=folder, runs=runs, experiment=base)


def _mean_std(values: list[float]) -> dict[str, float | int]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def aggregate(plan_runs: list[tuple[str, int, Path]], stages: list[str] | None, metric: str) -> dict[str, Any]:
    """Mean and standard deviation across seeds of each (variant, model) row."""
    table: dict[tuple[str, str], dict[str, list[Any]]] = {}
    curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for variant, seed, run_dir in plan_runs:
        final_path = run_dir / "final.json"
        if not final_path.exists():
            continue
        for row in json.loads(final_path.read_text())["rows"]:
            if stages is not None and row["name"] not in stages:
                continue
            key = (variant, row["name"])
            bucket = table.setdefault(key, {k: [] for k in ("final", "best", "best_val", "agreement", "probe", "nll", "ece", "kl", "perplexity", "latency_ms", "params", "seeds", "best_epoch", "time")})
            bucket["final"].append(row["test"].get(metric))
            bucket["agreement"].append(row["test"].get("agreement"))
            bucket["probe"].append(row["test"].get("probe_accuracy"))
            bucket["nll"].append(row["test"].get("nll"))
            bucket["ece"].append(row["test"].get("ece"))
            bucket["kl"].append(row["test"].get("kl_to_teacher"))
            bucket["perplexity"].append(row["test"].get("perplexity"))
            bucket["latency_ms"].append(row.get("latency_ms"))
            bucket["time"].append(row.get("train_time_s"))
            bucket["params"].append(row["params"])
            bucket["seeds"].append(seed)
            best = row.get("best") or {}
            bucket["best"].append((best.get("test") or {}).get(metric))
            bucket["best_val"].append((best.get("val") or {}).get(metric))
            bucket["best_epoch"].append(best.get("epoch"))
            summary_path = run_dir / "stages" / row["name"] / "summary.json"
            if summary_path.exists():
                for record in json.loads(summary_path.read_text()).get("history", []):
                    split = "val" if "val" in record else "test"
                    curves.setdefault(key, {}).setdefault(record["epoch"], []).append(record[split].get(metric))
    rows = []
    variants = list(dict.fromkeys(variant for variant, _ in table))
    shared = set()
    for name in dict.fromkeys(name for _, name in table):
        buckets = [table.get((variant, name)) for variant in variants]
        # A model every variant trained identically (a reused teacher) is one row, not one per variant.
        if len(variants) > 1 and all(b is not None for b in buckets) and all(
            b["final"] == buckets[0]["final"] and b["best"] == buckets[0]["best"] for b in buckets
        ):
            shared.add(name)
    for (variant, name), bucket in table.items():
        if name in shared:
            if variant != variants[0]:
                continue
            variant = "(all)"
        rows.append(
            {
                "variant": variant,
                "model": name,
                "seeds": bucket["seeds"],
                "final": _mean_std(bucket["final"]),
                "best": _mean_std(bucket["best"]),
                "best_val": _mean_std(bucket["best_val"]),
                "best_epoch": bucket["best_epoch"],
                "agreement": _mean_std(bucket["agreement"]),
                "probe_accuracy": _mean_std(bucket["probe"]),
                "nll": _mean_std(bucket["nll"]),
                "ece": _mean_std(bucket["ece"]),
                "kl_to_teacher": _mean_std(bucket["kl"]),
                "perplexity": _mean_std(bucket["perplexity"]),
                "train_time_s": _mean_std(bucket["time"]),
                "latency_ms": _mean_std(bucket["latency_ms"]),
                "params": bucket["params"][0],
                "curve": {str(e): _mean_std(v) for e, v in sorted(curves.get((variant, name), {}).items())},
            }
        )
    return {"metric": metric, "rows": rows}


def run_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder (one with a ``stages/`` folder) at or below ``paths``."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"--reuse {path}: no such folder")
        found += sorted({p.parent for p in path.rglob("stages") if p.is_dir()})
    return found


def run_compare(
    plan: ComparePlan, *, callbacks: Iterable[Callback] = (), on_run: Any = None, reuse: Iterable[str | Path] = ()
) -> Path:
    """Run (or resume) every run of ``plan``, then write compare.json, compare.md and compare.png.

    Stages identical to a finished stage (same fingerprint: same configuration, data and seed)
    in an earlier run of this comparison, or in a run folder under ``reuse``, are copied.
    """
    from distill.engine.runner import run_experiment
    from distill.report.compare_report import build_compare_report

    plan.folder.mkdir(parents=True, exist_ok=True)
    callbacks = list(callbacks)
    earlier = run_folders(reuse)
    finished: dict[int, list[Path]] = {}
    started = datetime.now()
    for index, (variant, seed, experiment, run_dir) in enumerate(plan.runs):
        if on_run is not None:
            on_run(index, len(plan.runs), variant, seed)
        if not (run_dir / "final.json").exists():
            run_experiment(experiment, run_dir=run_dir, callbacks=callbacks, reuse_dirs=finished.get(seed, []) + earlier)
        finished.setdefault(seed, []).append(run_dir)
    result = aggregate([(v, s, d) for v, s, _, d in plan.runs], plan.experiment.compare.stages, plan.experiment.compare.metric)
    result["experiment"] = plan.experiment.name
    result["variants"] = {name: overrides for name, overrides in (plan.experiment.compare.variants or {"default": {}}).items()}
    result["seeds"] = sorted({s for _, s, _, _ in plan.runs})
    result["runs"] = [{"variant": v, "seed": s, "run_dir": str(d)} for v, s, _, d in plan.runs]
    result["wall_time_s"] = (datetime.now() - started).total_seconds()
    from distill.engine.context import environment_summary

    result["environment"] = environment_summary()
    atomic_write_json(plan.folder / "compare.json", result)
    return build_compare_report(plan.folder)
