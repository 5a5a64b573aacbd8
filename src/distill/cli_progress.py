"""Console output of the command line: a progress bar per stage and the final table (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from distill.engine.callbacks import Callback


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


class RichProgress(Callback):
    """One progress bar per stage with loss, epoch and ETA; one line per evaluation."""

    def __init__(self, console: Console | None = None, show_bar: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.show_bar = show_bar
        self.progress: Progress | None = None
        self.task: Any = None

    def on_run_start(self, run_dir: str, experiment: Any) -> None:
        self.console.print(f"[bold]{experiment.name}[/bold]: run folder [cyan]{run_dir}[/cyan]")

    def on_stage_start(self, stage: str, total_steps: int, start_step: int, epochs: int) -> None:
        self.console.print(f"stage [bold]{stage}[/bold]: {total_steps} optimizer steps over {epochs} epoch(s)")
        if not self.show_bar:
            return
        self.progress = Progress(
            TextColumn("[bold blue]{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}  {task.fields[accuracy]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            stage, total=total_steps, completed=start_step, stage=stage, epoch="-", loss="-", accuracy=""
        )

    def on_step(self, stage: str, step: int, total_steps: int, values: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{values['loss']:.4f}", epoch=int(values.get("epoch", 0)))

    def on_eval(self, stage: str, record: dict[str, Any]) -> None:
        split = "val" if "val" in record else "test"
        metrics = record[split]
        if "perplexity" in metrics:  # language models: token-level metrics
            text = f"{split} ppl {metrics['perplexity']:.2f}"
            if "kl_to_teacher" in metrics:
                text += f", KL to teacher {metrics['kl_to_teacher']:.4f}"
        else:
            text = f"{split} acc {_pct(metrics['accuracy'])}"
        if self.progress is not None:
            self.progress.update(self.task, accuracy=text)
        else:
            agreement = f", agreement {_pct(metrics['agreement'])}" if "agreement" in metrics else ""
            self.console.print(f"  {stage} epoch {record['epoch']}: {text}, NLL {metrics['nll']:.4f}{agreement}")

    def on_stage_end(self, stage: str, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        final = (summary.get("final") or {}).get("test", {})
        if final:
            result = f"test ppl {final['perplexity']:.2f}" if "perplexity" in final else f"test acc {_pct(final['accuracy'])}"
            self.console.print(f"stage [bold]{stage}[/bold] done in {summary['train_time_s']:.1f} s: {result}")

    def on_message(self, text: str) -> None:
        self.console.print(text)


def final_rich_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Results on the test split")
    if any("perplexity" in row["test"] for row in rows):
        return _language_model_rich_table(rows)
    probed = any("probe_accuracy" in row["test"] for row in rows)
    columns = ("model", "network", "teacher", "test acc", *(["probe acc"] if probed else []), "agreement", "NLL", "ECE", "params", "latency ms")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "network", "teacher") else "right")
    for row in rows:
        test = row["test"]
        table.add_row(
            row["name"] + (" (ref)" if row.get("is_reference") else ""),
            row["model"],
            row.get("teacher") or "-",
            _pct(test["accuracy"]),
            *([_pct(test.get("probe_accuracy"))] if probed else []),
            _pct(test.get("agreement")),
            f"{test['nll']:.4f}",
            f"{test['ece']:.4f}",
            f"{row['params']:,}",
            f"{row['latency_ms']:.3f}" if row.get("latency_ms") is not None else "-",
        )
    return table


def _language_model_rich_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Results on the test split (target tokens)")
    columns = ("model", "network", "teacher", "perplexity", "NLL", "token acc", "KL to teacher", "agreement", "params")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "network", "teacher") else "right")
    for row in rows:
        test = row["test"]
        table.add_row(
            row["name"] + (" (ref)" if row.get("is_reference") else ""),
            row["model"],
            row.get("teacher") or "-",
            f"{test['perplexity']:.3f}",
            f"{test['nll']:.4f}",
            _pct(test.get("accuracy")),
            f"{test['kl_to_teacher']:.4f}" if "kl_to_teacher" in test else "-",
            _pct(test.get("agreement")),
            f"{row['params']:,}",
        )
    return table
