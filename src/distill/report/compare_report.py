"""The table and plot of a comparison, rebuilt from ``compare.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.io import atomic_write_text
from distill.report.run_report import markdown_table

PERCENT_METRICS = {"accuracy", "agreement"}


def _ms(stat: dict[str, Any], percent: bool, digits: int = 2) -> str:
    mean, std = stat.get("mean"), stat.get("std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if percent:
        return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"
    places = 4 if digits == 2 else digits
    return f"{mean:.{places}f} ± {std:.{places}f}"


def compare_table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    percent = metric in PERCENT_METRICS
    unit = " (%)" if percent else ""
    show_variant = len({row["variant"] for row in result["rows"]}) > 1
    probed = any((row.get("probe_accuracy") or {}).get("n", 0) > 0 for row in result["rows"])
    has = lambda key: any((row.get(key) or {}).get("n", 0) > 0 for row in result["rows"])  # noqa: E731
    language = has("kl_to_teacher") or has("perplexity")
    extra_perplexity = language and metric != "perplexity"
    header = (["variant"] if show_variant else []) + [
        "model",
        f"test {metric}{unit}, final epoch",
        f"test {metric}{unit}, best-val epoch",
        f"val {metric}{unit}, best epoch",
        "agreement (%)",
        *(["linear probe acc (%)"] if probed else []),
        *((["test perplexity"] if extra_perplexity else []) + ["KL to teacher (nats/token)", "train time (s)"] if language else ["ECE"]),
        "params",
        "seeds",
    ]
    body = []
    for row in result["rows"]:
        body.append(
            ([row["variant"]] if show_variant else [])
            + [
                row["model"],
                _ms(row["final"], percent),
                _ms(row["best"], percent),
                _ms(row["best_val"], percent),
                _ms(row["agreement"], True),
                *([_ms(row.get("probe_accuracy"), True)] if probed else []),
                *(
                    ([_ms(row.get("perplexity") or {}, False, 3)] if extra_perplexity else [])
                    + [_ms(row.get("kl_to_teacher") or {}, False), _ms(row.get("train_time_s") or {}, False, 0)]
                    if language
                    else [_ms(row["ece"], False)]
                ),
                f"{row['params']:,}",
                str(len(row["seeds"])),
            ]
        )
    return markdown_table(header, body)


def plot_mean_band(axis: Any, x: list, means: list[float], stds: list[float], label: str) -> None:
    """One curve of means with a shaded band of one standard deviation around it."""
    (line,) = axis.plot(x, means, marker="o", markersize=3, label=label)
    axis.fill_between(x, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2, color=line.get_color())


def save_band_figure(figure: Any, axis: Any, path: Path, title: str) -> None:
    """Title, grid and legend of a mean-and-band plot, then write it as a PNG and close it."""
    import matplotlib.pyplot as plt

    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot(result: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["curve"]]
    if not rows:
        return False
    percent = result["metric"] in PERCENT_METRICS
    scale = 100.0 if percent else 1.0
    show_variant = len({row["variant"] for row in result["rows"]}) > 1
    figure, axis = plt.subplots(figsize=(7.0, 4.2))
    for row in rows:
        epochs = sorted(int(e) for e in row["curve"])
        means = [scale * row["curve"][str(e)]["mean"] for e in epochs]
        stds = [scale * row["curve"][str(e)]["std"] for e in epochs]
        plot_mean_band(axis, epochs, means, stds, f"{row['variant']}/{row['model']}" if show_variant else row["model"])
    axis.set_xlabel("epoch")
    axis.set_ylabel(f"validation {result['metric']}" + (" (%)" if percent else ""))
    save_band_figure(figure, axis, path, f"{result.get('experiment', '')}: mean ± std over seeds {result.get('seeds', '')}")
    return True


def build_compare_report(folder: str | Path) -> Path:
    """Write ``compare.md`` and ``compare.png`` from ``compare.json``; return the markdown path."""
    folder = Path(folder)
    result = json.loads((folder / "compare.json").read_text())
    lines = [f"# Comparison: {result.get('experiment', folder.name)}", ""]
    lines.append(
        f"Seeds {result.get('seeds')}; mean ± sample standard deviation across seeds. "
        "'final epoch' uses the weights after the last epoch; 'best-val epoch' uses the epoch with the best "
        "validation score (model selection on the validation split), reported on the test split."
    )
    if "wall_time_s" in result:
        environment = result.get("environment", {})
        lines.append(
            f"Wall time {result['wall_time_s'] / 60:.1f} min on {environment.get('cpu', '?')} "
            f"({environment.get('cpu_count', '?')} cores, {environment.get('torch_threads', '?')} torch threads)."
        )
    lines += ["", compare_table(result), ""]
    if result.get("variants") and any(result["variants"].values()):
        lines += ["Variants (overrides of the experiment):", ""]
        for name, overrides in result["variants"].items():
            lines.append(f"- `{name}`: " + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "as written"))
        lines.append("")
    if _plot(result, folder / "compare.png"):
        lines += ["![validation curves, mean ± std over seeds](compare.png)", ""]
    path = folder / "compare.md"
    atomic_write_text(path, "\n".join(lines))
    return path
