"""``report.md`` and its plots, rebuilt at any time from a run folder's files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distill.io import atomic_write_text, read_jsonl


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def final_table(rows: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """The table of every model on the test split (one row per stage result / external teacher).

    The last column is the validation ``metric`` at the epoch that was best by that metric.
    """
    if any("perplexity" in row["test"] for row in rows):
        return _language_model_table(rows, metric)
    probed = any("probe_accuracy" in row["test"] for row in rows)
    header = ["model", "network", "teacher", "test acc", *(["linear probe acc"] if probed else []), "agreement", "NLL", "ECE", "params", "latency (ms/sample)", f"best val {metric} (epoch)"]
    body = []
    for row in rows:
        test = row["test"]
        probe = [_pct(test.get("probe_accuracy"))] if probed else []
        best = row.get("best") or {}
        best_val = (best.get("val") or {}).get(metric)
        body.append(
            [
                row["name"] + (" (reference)" if row.get("is_reference") else ""),
                row["model"],
                row.get("teacher") or "-",
                _pct(test["accuracy"]),
                *probe,
                _pct(test.get("agreement")),
                _fmt(test["nll"]),
                _fmt(test["ece"]),
                f"{row['params']:,}",
                _fmt(row.get("latency_ms"), 3),
                f"{_pct(best_val) if metric in ('accuracy', 'agreement') else _fmt(best_val)} ({best.get('epoch')})"
                if best_val is not None
                else "-",
            ]
        )
    return markdown_table(header, body)


def _language_model_table(rows: list[dict[str, Any]], metric: str) -> str:
    """The final table of language models: token-level metrics on the test split's target tokens."""
    header = ["model", "network", "teacher", "perplexity", "NLL (nats/token)", "token acc", "KL to teacher (nats/token)",
              "top-1 agreement", "params", f"best val {metric} (epoch)"]
    body = []
    for row in rows:
        test = row["test"]
        best = row.get("best") or {}
        best_val = (best.get("val") or {}).get(metric)
        body.append(
            [
                row["name"] + (" (reference)" if row.get("is_reference") else ""),
                row["model"],
                row.get("teacher") or "-",
                _fmt(test.get("perplexity"), 3),
                _fmt(test.get("nll")),
                _pct(test.get("accuracy")),
                _fmt(test.get("kl_to_teacher")),
                _pct(test.get("agreement")),
                f"{row['params']:,}",
                f"{_pct(best_val) if metric in ('accuracy', 'agreement') else _fmt(best_val)} ({best.get('epoch')})"
                if best_val is not None
                else "-",
            ]
        )
    return markdown_table(header, body)


def _plot_training(records: list[dict[str, Any]], stages: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    shown = [s for s in stages if any(r["stage"] == s for r in train)]
    if not shown:
        return False
    figure, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for axis, stage in zip(axes[0], shown):
        rows = [r for r in train if r["stage"] == stage]
        steps = [r["step"] for r in rows]
        axis.plot(steps, [r["loss"] for r in rows], label="total", linewidth=2, color="black")
        term_names = list(rows[0].get("terms", {})) if rows else []
        if len(term_names) > 1:
            for name in term_names:
                axis.plot(steps, [r["terms"].get(name) for r in rows], label=name, linewidth=1)
        axis.set_title(stage)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (unweighted terms)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _plot_accuracy(records: list[dict[str, Any]], stages: list[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    if not evals:
        return False
    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for stage in stages:
        rows = [r for r in evals if r["stage"] == stage]
        if not rows:
            continue
        split = "val" if "val" in rows[0] else "test"
        axis.plot([r["epoch"] for r in rows], [100 * r[split]["accuracy"] for r in rows], marker="o", label=f"{stage} ({split})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _plot_mixture(records: list[dict[str, Any]], stages: list[str], path: Path) -> list[str]:
    """Domain sampling weights over optimizer steps (DDK), one panel per stage; the stages plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixture = [r for r in records if r.get("kind") == "mixture"]
    shown = [s for s in stages if any(r["stage"] == s for r in mixture)]
    if not shown:
        return []
    figure, axes = plt.subplots(1, len(shown), figsize=(5.0 * len(shown), 3.6), squeeze=False)
    for axis, stage in zip(axes[0], shown):
        rows = [r for r in mixture if r["stage"] == stage]
        for domain in rows[0]["weights"]:
            axis.plot([r["step"] for r in rows], [r["weights"][domain] for r in rows], marker="o", label=domain)
        axis.set_title(stage)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("sampling weight")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return shown


def _mixture_table(records: list[dict[str, Any]], stage: str) -> str:
    rows = [r for r in records if r.get("kind") == "mixture" and r["stage"] == stage]
    domains = list(rows[0]["weights"])
    header = ["step", *[f"{d} weight" for d in domains], *[f"{d} NLL student/teacher" for d in domains]]
    body = [
        [str(r["step"]), *[f"{r['weights'][d]:.3f}" for d in domains],
         *[f"{r['student_nll'][d]:.3f} / {r['teacher_nll'][d]:.3f}" for d in domains]]
        for r in rows
    ]
    return markdown_table(header, body)


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` of a run folder and return the report's path."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml")
    config = yaml.safe_load(config_path.read_text())
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    final = json.loads((run_dir / "final.json").read_text()) if (run_dir / "final.json").exists() else {"rows": []}
    records = read_jsonl(run_dir / "metrics.jsonl")
    stages = [s["name"] for s in config.get("stages", [])]
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)

    environment = run_info.get("environment", {})
    lines = [f"# {config['name']}", ""]
    lines.append(
        f"Data: `{config['data']['dataset']}`, seed {config.get('seed')}, {run_info.get('processes', 1)} process(es); "
        f"status: {run_info.get('status', 'unknown')}"
        + (f", wall time {run_info['wall_time_s']:.1f} s" if "wall_time_s" in run_info else "")
        + "."
    )
    if environment:
        lines.append(
            f"Machine: {environment.get('cpu')} ({environment.get('cpu_count')} cores, {environment.get('torch_threads')} torch threads)"
            f"{', ' + environment['cuda'] if environment.get('cuda') else ''}; torch {environment.get('torch')}."
        )
    lines.append("")
    if final["rows"]:
        metric = config.get("compare", {}).get("metric", "accuracy")
        lines += ["## Results on the test split", "", final_table(final["rows"], metric), ""]
        lines.append(
            "Agreement: share of test samples where the model's top-1 class equals the reference model's. "
            "Latency: median CPU time of one forward pass on one sample. The last column is the best "
            f"validation {metric} over the epochs, with its epoch; the other columns are the final weights."
        )
        lines.append("")

    if _plot_training(records, stages, plots / "loss.png"):
        lines += ["## Training loss", "", "![loss terms over optimizer steps](plots/loss.png)", ""]
    if _plot_accuracy(records, stages, plots / "accuracy.png"):
        lines += ["## Accuracy over epochs", "", "![accuracy per epoch](plots/accuracy.png)", ""]
    domain_rows = [r for r in final["rows"] if r.get("domain_perplexity")]
    if domain_rows:
        names = list(domain_rows[0]["domain_perplexity"])
        lines += ["## Test perplexity per domain", "",
                  markdown_table(["model", *names], [[r["name"], *[f"{r['domain_perplexity'][n]:.1f}" for n in names]] for r in domain_rows]), ""]
    mixed = _plot_mixture(records, stages, plots / "domain_weights.png")
    if mixed:
        lines += ["## Domain weights (DDK)", "", "![domain sampling weights over optimizer steps](plots/domain_weights.png)", ""]
        for stage in mixed:
            lines += [f"Stage `{stage}`: weights after each update, and each domain's validation NLL (nats/token).", "",
                      _mixture_table(records, stage), ""]

    for stage in stages:
        evals = [r for r in records if r.get("kind") == "eval" and r["stage"] == stage]
        if not evals:
            continue
        lines += [f"### Stage `{stage}`", ""]
        header = ["epoch", "step"]
        splits = [s for s in ("val", "test") if s in evals[0]]
        language = "perplexity" in evals[0][splits[0]] if splits else False
        third = ("perplexity", "PPL") if language else ("ece", "ECE")
        for split in splits:
            header += [f"{split} acc", f"{split} NLL", f"{split} {third[1]}"]
            if "kl_to_teacher" in evals[0][split]:
                header.append(f"{split} KL to teacher")
            if "agreement" in evals[0][split]:
                header.append(f"{split} agreement")
        body = []
        for record in evals:
            row = [str(record["epoch"]), str(record["step"])]
            for split in splits:
                metrics = record[split]
                row += [_pct(metrics["accuracy"]), _fmt(metrics["nll"]), _fmt(metrics.get(third[0]))]
                if "kl_to_teacher" in evals[0][split]:
                    row.append(_fmt(metrics.get("kl_to_teacher")))
                if "agreement" in evals[0][split]:
                    row.append(_pct(metrics.get("agreement")))
            body.append(row)
        lines += [markdown_table(header, body), ""]

    lines += ["## Configuration", "", "```yaml", config_path.read_text().rstrip(), "```", ""]
    report_path = run_dir / "report.md"
    atomic_write_text(report_path, "\n".join(lines))
    return report_path
