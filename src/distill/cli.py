"""The ``distill`` command line: the only layer that reads arguments and prints.

    distill run EXP.yaml [--set key.path=value ...] [--resume [RUN_DIR]]
    distill compare EXP.yaml [--seeds 0,1,2] [--variants a,b] [--resume [FOLDER]]
    distill report RUN_DIR|COMPARE_FOLDER|ACTIVE_FOLDER|PGKD_FOLDER
    distill list [models|datasets|losses|optimizers|schedulers]
    distill validate EXP.yaml [--set ...] [--print]
    distill search-student EXP.yaml [--set ...] [--run RUN_DIR] [--reuse FOLDER] [--out DIR]
    distill cache-teacher EXP.yaml [--set ...] [--teacher KEY | --endpoint URL] [--out DIR] [--k K] [--value-bits 8|16]
    distill cache verify|info PATH
    distill select-data EXP.yaml [--set ...] [--out DIR] [--fraction F]
    distill active EXP.yaml [--set ...] [--out DIR] [--strategies a,b] [--seeds 0,1,2] [--reuse FOLDER]
    distill generate SPEC.yaml [--set ...] [--overwrite] [--limit N]
    distill pgkd EXP.yaml [--set ...] [--out DIR]
    distill serve MODEL|RUN_DIR [--stage S] [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from distill import __version__

EXIT_CONFIG = 2


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Knowledge distillation from one YAML experiment.")
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_overrides(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set optimizer.lr=0.01 --set stages.distilled.epochs=5",
        )

    run = commands.add_parser("run", help="train, evaluate, checkpoint and report one experiment")
    run.add_argument("config", nargs="?", help="experiment YAML file")
    add_overrides(run)
    run.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                     help="continue a stopped run: the newest run of this experiment, or RUN_DIR")
    run.add_argument("--no-progress", action="store_true", help="print evaluation lines instead of a progress bar")
    run.add_argument("--reuse", action="append", default=[], metavar="FOLDER",
                     help="copy stages identical to finished ones in run folders under FOLDER instead of training them")

    compare = commands.add_parser("compare", help="run the experiment's variants over several seeds and tabulate")
    compare.add_argument("config", nargs="?", help="experiment YAML file")
    add_overrides(compare)
    compare.add_argument("--seeds", type=_parse_ints, help="comma-separated seeds (default: compare.seeds)")
    compare.add_argument("--variants", help="comma-separated variant names (default: all)")
    compare.add_argument("--resume", nargs="?", const="latest", metavar="FOLDER",
                         help="continue a stopped comparison: the newest one of this experiment, or FOLDER")
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument("--reuse", action="append", default=[], metavar="FOLDER",
                         help="copy stages identical to finished ones in run folders under FOLDER (e.g. an earlier comparison)")

    report = commands.add_parser("report", help="rebuild report.md (run folder), compare.md (comparison folder), active.md (active folder) or pgkd.md (PGKD folder)")
    report.add_argument("folder")

    listing = commands.add_parser("list", help="list registered components with one-line docs")
    listing.add_argument("kind", nargs="?", choices=["models", "datasets", "losses", "optimizers", "schedulers", "rewards"])

    validate = commands.add_parser("validate", help="check an experiment without running it")
    validate.add_argument("config")
    add_overrides(validate)
    validate.add_argument("--print", action="store_true", help="print the resolved experiment as YAML")

    cka = commands.add_parser("cka", help="linear CKA between a student's and a teacher's layers in a finished run")
    cka.add_argument("run_dir", help="run folder (runs/<experiment>/<timestamp>)")
    cka.add_argument("--student", required=True, help="stage whose model is compared")
    cka.add_argument("--teacher", required=True, help="stage (or `models` key) it is compared with")
    cka.add_argument("--student-layers", default=None, help="comma-separated module paths (default: the model's stages)")
    cka.add_argument("--teacher-layers", default=None, help="comma-separated module paths (default: the model's stages)")
    cka.add_argument("--samples", type=int, default=1000, help="samples of the split used (default 1000)")
    cka.add_argument("--split", default="test", choices=["test", "val", "train"])

    search = commands.add_parser("search-student", help="rank candidate students without training them (DisWOT)")
    search.add_argument("config", help="experiment YAML file with a `search:` section")
    add_overrides(search)
    search.add_argument("--run", metavar="RUN_DIR", help="a run folder of this experiment holding the trained teacher stage")
    search.add_argument("--reuse", action="append", default=[], metavar="FOLDER",
                        help="copy identical finished stages from run folders under FOLDER when the teacher must be trained")
    search.add_argument("--out", metavar="DIR", help="output folder (default: <output_dir>/<name>/search-<timestamp>/)")
    search.add_argument("--no-progress", action="store_true", help="no progress bar")

    cache_teacher = commands.add_parser(
        "cache-teacher", help="run a language-model teacher over the training split once and store its top-k (resumable)"
    )
    cache_teacher.add_argument("config", help="experiment YAML file (its `cache:` section gives the defaults)")
    add_overrides(cache_teacher)
    cache_teacher.add_argument("--teacher", help="key in `models` of the teacher (default: cache.teacher)")
    cache_teacher.add_argument("--out", help="output folder (default: cache.path)")
    cache_teacher.add_argument("--k", type=int, help="most likely tokens kept per position (default: cache.k or 64)")
    cache_teacher.add_argument("--value-bits", type=int, choices=[8, 16], help="bits per log-probability (default 8)")
    cache_teacher.add_argument("--batch-size", type=int, help="sequences per teacher forward pass")
    cache_teacher.add_argument("--endpoint", metavar="URL",
                               help="cache a black-box OpenAI-compatible endpoint (e.g. `distill serve`) instead of a local model")
    cache_teacher.add_argument("--endpoint-model", metavar="NAME", help="model name at the endpoint (default: its first)")
    cache_teacher.add_argument("--api-key-env", metavar="ENV_NAME", help="environment variable holding the endpoint's key")
    cache_teacher.add_argument("--response-cache", metavar="DIR", help="also keep the endpoint's answers here (a rerun asks nothing twice)")
    cache_teacher.add_argument("--concurrency", type=int, help="requests in flight at once (default 8)")
    cache_teacher.add_argument("--shard-rows", type=int, help="training rows per shard")
    cache_teacher.add_argument("--no-progress", action="store_true", help="no progress bar")

    select = commands.add_parser("select-data", help="MiniPLM difference sampling: keep the documents a teacher knows and a small model does not")
    select.add_argument("config", help="experiment YAML file with a `select:` section")
    add_overrides(select)
    select.add_argument("--out", help="output folder (default: select.out)")
    select.add_argument("--fraction", type=float, help="share of the documents kept (default: select.fraction)")
    select.add_argument("--no-progress", action="store_true", help="no progress bar")

    active = commands.add_parser("active", help="active distillation: rounds of select -> distil -> evaluate per strategy and seed")
    active.add_argument("config", help="experiment YAML file with an `active:` section")
    add_overrides(active)
    active.add_argument("--out", metavar="DIR", help="output folder (default: <output_dir>/<name>/active/); a rerun continues it")
    active.add_argument("--strategies", help="comma-separated strategies (default: active.strategies)")
    active.add_argument("--seeds", type=_parse_ints, help="comma-separated seeds (default: active.seeds)")
    active.add_argument("--reuse", action="append", default=[], metavar="FOLDER",
                        help="copy a finished teacher stage identical to the experiment's from run folders under FOLDER")
    active.add_argument("--no-progress", action="store_true", help="no progress bar")

    cache = commands.add_parser("cache", help="inspect or verify a teacher cache or a data-selection score store")
    cache.add_argument("action", choices=["verify", "info"], help="verify: re-hash every shard; info: what it holds")
    cache.add_argument("path", help="the store's folder")

    from distill.pgkd import add_pgkd_parser
    from distill.serve.cli import add_serve_parser
    from distill.synth.pipeline import add_generate_parser

    add_generate_parser(commands)
    add_pgkd_parser(commands)
    add_serve_parser(commands)
    return parser


def _row_progress(console: Console, no_progress: bool, label: str) -> tuple[Any, Any]:
    """A rich progress bar over rows and the ``advance(done, total)`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(f"[bold blue]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=no_progress or not console.is_terminal,
    )
    task = progress.add_task(label, total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, advance


def _command_cache_teacher(args: argparse.Namespace, console: Console) -> int:
    if args.endpoint:
        from distill.cache.endpoint import command_cache_endpoint

        return command_cache_endpoint(args, console)
    from distill.cache.teacher import build_teacher_cache
    from distill.config import ConfigError, load_experiment

    experiment = load_experiment(args.config, args.overrides)
    section = experiment.cache
    teacher = args.teacher or (section.teacher if section else None)
    out = args.out or (section.path if section else None)
    if teacher is None or out is None:
        raise ConfigError(["say which teacher and where: a `cache: {teacher: KEY, path: DIR}` section, or --teacher and --out"])
    settings = {
        "k": args.k or (section.k if section else 64),
        "value_bits": args.value_bits or (section.value_bits if section else 8),
        "batch_size": args.batch_size or (section.batch_size if section else 8),
        "shard_rows": args.shard_rows or (section.shard_rows if section else 256),
    }
    console.print(f"caching the top-{settings['k']} of teacher '{teacher}' into [cyan]{out}[/cyan]")
    progress, advance = _row_progress(console, args.no_progress, "teacher cache")
    with progress:
        manifest = build_teacher_cache(experiment, out, teacher=teacher, progress=advance, log=console.print, **settings)
    stats = manifest["stats"]
    _stdout().print(
        f"cache complete: {manifest['rows']:,} rows, {stats['tokens']:,} tokens, {len(manifest['shards'])} shards, "
        f"{stats['bytes'] / 1e6:.1f} MB ({stats['bytes_per_token']:.1f} bytes/token, records of {stats['record_bytes']} bytes)"
    )
    return 0


def _command_select(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from distill.config import load_experiment
    from distill.selection import select_data

    experiment = load_experiment(args.config, args.overrides)
    progress = Progress(
        TextColumn("[bold blue]scoring with the {task.fields[role]}"), BarColumn(), MofNCompleteColumn(), TextColumn("documents"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=args.no_progress or not console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def advance(role: str, done: int, total: int) -> None:
        if role not in tasks:
            tasks[role] = progress.add_task(role, total=total, role=role)
        progress.update(tasks[role], completed=done, total=total)

    with progress:
        summary = select_data(experiment, out=args.out, fraction=args.fraction, progress=advance, log=console.print)
    out = Path(args.out or experiment.select.out)
    _stdout().print(
        f"kept {summary['kept']:,} of {summary['documents']:,} documents ({summary['tokens_kept']:,} of {summary['tokens_total']:,} "
        f"target tokens); mean score {summary['score_kept_mean']:.4f} kept vs {summary['score_all_mean']:.4f} all"
    )
    for name, share in (summary.get("kept_share_by_domain") or {}).items():
        _stdout().print(f"  {name}: {100 * share:.1f}% of its documents kept" if share is not None else f"  {name}: no documents")
    _stdout().print(f"train on it with: data.select: {out}   (ranked documents: {out / 'selected.jsonl'})")
    return 0


def _command_cache(args: argparse.Namespace, console: Console) -> int:
    from distill.cache.store import ShardedReader

    reader = ShardedReader(args.path)
    out = _stdout()
    if args.action == "verify":
        problems = reader.verify()
        for problem in problems:
            console.print(f"[red]bad shard:[/red] {escape(problem)}", highlight=False)
        if problems:
            return 1
        out.print(f"{args.path}: all {len(reader.entries)} shards match their checksums ({reader.total_bytes / 1e6:.1f} MB)")
        return 0
    import json

    records = reader.total_records
    summary = {
        "kind": reader.manifest["kind"], "rows": reader.rows, "records": records, "shards": len(reader.entries),
        "bytes": reader.total_bytes, "bytes_per_record": round(reader.total_bytes / records, 3) if records else None,
        "meta": reader.meta,
    }
    out.print(json.dumps(summary, indent=2, sort_keys=True), markup=False, highlight=False)
    return 0


def _stdout() -> Console:
    """Standard output, at least 140 columns wide so that result tables are never truncated."""
    return Console(width=max(Console().width, 140))


def _progress(console: Console, no_progress: bool) -> list:
    from distill.cli_progress import RichProgress

    show_bar = not no_progress and console.is_terminal
    return [RichProgress(console, show_bar=show_bar)]


def _command_run(args: argparse.Namespace, console: Console) -> int:
    from distill.cli_progress import final_rich_table
    from distill.config import ConfigError, load_experiment
    from distill.engine.runner import CONFIG_FILE, latest_run_dir, run_experiment

    run_dir = None
    if args.resume:
        if args.resume == "latest":
            if not args.config:
                raise ConfigError(["--resume without RUN_DIR needs the experiment file to find its newest run"])
            experiment = load_experiment(args.config, args.overrides)
            run_dir = latest_run_dir(experiment)
            if run_dir is None:
                raise ConfigError([f"no earlier run of '{experiment.name}' under {experiment.output_dir}/ to resume"])
        else:
            run_dir = Path(args.resume)
            if not (run_dir / CONFIG_FILE).is_file():
                raise ConfigError([f"{run_dir} is not a run folder (no {CONFIG_FILE})"])
        if args.overrides:
            raise ConfigError(["--set cannot be combined with --resume: a resumed run keeps the configuration it started with"])
        experiment = load_experiment(run_dir / CONFIG_FILE)
        console.print(f"resuming [cyan]{run_dir}[/cyan]")
    else:
        if not args.config:
            raise ConfigError(["give an experiment file: distill run EXP.yaml"])
        experiment = load_experiment(args.config, args.overrides)
    from distill.engine.compare import run_folders

    result = run_experiment(
        experiment, run_dir=run_dir, callbacks=_progress(console, args.no_progress), reuse_dirs=run_folders(args.reuse)
    )
    if int(os.environ.get("RANK", "0")) == 0:
        _stdout().print(final_rich_table(result.rows))
        _stdout().print(f"report: [bold]{result.run_dir / 'report.md'}[/bold]")
    return 0


def _command_compare(args: argparse.Namespace, console: Console) -> int:
    from distill.config import ConfigError, load_raw
    from distill.engine.compare import plan_compare, run_compare
    from distill.report.compare_report import compare_table

    import json

    if not args.config:
        raise ConfigError(["give an experiment file: distill compare EXP.yaml"])
    raw, lines = load_raw(args.config, args.overrides)
    variants = [v for v in args.variants.split(",") if v] if args.variants else None
    folder = None
    if args.resume:
        plan = plan_compare(raw, lines, args.config, seeds=args.seeds, variants=variants)
        if args.resume == "latest":
            base = Path(plan.experiment.output_dir) / plan.experiment.name
            candidates = sorted(base.glob("compare-*")) if base.is_dir() else []
            if not candidates:
                raise ConfigError([f"no earlier comparison of '{plan.experiment.name}' under {base} to resume"])
            folder = candidates[-1]
        else:
            folder = Path(args.resume)
    plan = plan_compare(raw, lines, args.config, seeds=args.seeds, variants=variants, folder=folder)
    console.print(f"comparison of {len(plan.runs)} runs in [cyan]{plan.folder}[/cyan]")

    def announce(index: int, total: int, variant: str, seed: int) -> None:
        console.rule(f"run {index + 1}/{total}: variant {variant}, seed {seed}")

    path = run_compare(plan, callbacks=_progress(console, args.no_progress), on_run=announce, reuse=args.reuse)
    result = json.loads((plan.folder / "compare.json").read_text())
    _stdout().print(compare_table(result), markup=False, highlight=False)
    _stdout().print(f"table: [bold]{path}[/bold]")
    return 0


def _command_report(args: argparse.Namespace, console: Console) -> int:
    from distill.report import build_compare_report, build_report

    folder = Path(args.folder)
    if (folder / "compare.json").is_file():
        path = build_compare_report(folder)
    elif (folder / "config.yaml").is_file():
        path = build_report(folder)
    elif (folder / "active.json").is_file():
        from distill.active import build_active_report

        path = build_active_report(folder)
    elif (folder / "pgkd.json").is_file():
        from distill.pgkd import build_pgkd_report

        path = build_pgkd_report(folder)
    else:
        console.print(
            f"[red]error:[/red] {folder} is neither a run folder (config.yaml), a comparison folder (compare.json), "
            "an active-distillation folder (active.json) nor a PGKD folder (pgkd.json)"
        )
        return 1
    Console().print(str(path))
    return 0


def _command_list(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from distill.registry import REGISTRIES, load_builtins

    load_builtins()
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    out = Console()
    for kind in kinds:
        table = Table(title=kind, show_header=True, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for entry in REGISTRIES[kind]:
            table.add_row(entry.name, entry.summary)
        out.print(table)
    return 0


def _command_validate(args: argparse.Namespace, console: Console) -> int:
    from distill.config import dump_experiment, load_experiment

    from distill.config import load_raw
    from distill.engine.compare import plan_compare

    experiment = load_experiment(args.config, args.overrides)
    if experiment.compare.variants:
        raw, lines = load_raw(args.config, args.overrides)
        plan_compare(raw, lines, args.config, seeds=experiment.compare.seeds[:1])  # validates every variant
    if args.print:
        Console().print(dump_experiment(experiment), markup=False, highlight=False)
    console.print(f"[green]ok[/green]: {args.config} is a valid experiment with {len(experiment.stages)} stage(s)")
    return 0


def _command_cka(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from distill.diagnostics import run_cka
    from distill.io import atomic_write_json

    def layers(text: str | None) -> list[str] | None:
        return [part.strip() for part in text.split(",") if part.strip()] if text else None

    result = run_cka(
        args.run_dir, args.student, args.teacher, student_layers=layers(args.student_layers),
        teacher_layers=layers(args.teacher_layers), samples=args.samples, split=args.split,
    )
    _stdout().print(
        f"linear CKA, {args.student} (rows) vs {args.teacher} (columns), {result['samples']} {args.split} samples",
        markup=False, highlight=False,
    )
    table = Table()
    table.add_column("student layer")
    for name in result["teacher_layers"]:
        table.add_column(name, justify="right")
    for name, values in zip(result["student_layers"], result["cka"]):
        table.add_row(name, *(f"{v:.3f}" for v in values))
    _stdout().print(table)
    path = Path(args.run_dir) / f"cka-{args.student}-{args.teacher}.json"
    atomic_write_json(path, result)
    _stdout().print(f"written: [bold]{path}[/bold]")
    return 0


def _command_search(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from distill.search import load_search_experiment, run_search

    experiment = load_search_experiment(args.config, args.overrides)
    show_bar = not args.no_progress and console.is_terminal
    progress = Progress(
        TextColumn("[bold blue]scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[name]}"),
        TimeElapsedColumn(), console=console, disable=not show_bar,
    )
    task = progress.add_task("search", total=None, name="")

    def advance(done: int, total: int, name: str) -> None:
        progress.update(task, completed=done, total=total, name=name)

    with progress:
        result, folder = run_search(
            experiment, run_dir=args.run, reuse=args.reuse, out=args.out, progress=advance,
            callbacks=_progress(console, args.no_progress), message=console.print,
        )
    table = Table(title="Students ranked by DisWOT score (training-free; higher is better)")
    for column in ("rank", "candidate", "params", "semantic", "relation", "total"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in result.rows:
        if row.total is None:
            table.add_row("-", row.name, f"{row.num_params:,}", "-", "-", f"skipped: {row.skipped}")
        else:
            table.add_row(str(row.rank), row.name, f"{row.num_params:,}", f"{row.semantic:.4f}", f"{row.relation:.4f}", f"{row.total:.4f}")
    out = _stdout()
    out.print(table)
    out.print(f"teacher: {result.teacher}", markup=False, highlight=False)
    out.print(f"{result.mode}: {len(result.ranked)} of {result.space_size} candidates scored ({result.evaluated - len(result.ranked)} skipped) in {result.wall_time_s:.2f} s")
    out.print(f"table: [bold]{folder / 'search.md'}[/bold]")
    return 0


def _command_active(args: argparse.Namespace, console: Console) -> int:
    from distill.active import active_table, run_active
    from distill.config import load_experiment
    from distill.engine.compare import run_folders

    experiment = load_experiment(args.config, args.overrides)
    strategies = [s for s in args.strategies.split(",") if s] if args.strategies else None

    def announce(strategy: str, seed: int, round_index: int, queried: int) -> None:
        console.rule(f"seed {seed}, {strategy}, round {round_index}: {queried} queried samples")

    result = run_active(
        experiment,
        output_dir=args.out,
        strategies=strategies,
        seeds=args.seeds,
        reuse=run_folders(args.reuse),
        callbacks=_progress(console, args.no_progress),
        on_cell=announce,
    )
    _stdout().print(active_table(result.result), markup=False, highlight=False)
    _stdout().print(f"table: [bold]{result.folder / 'active.md'}[/bold]")
    return 0


def _command_generate(args: argparse.Namespace, console: Console) -> int:
    from distill.synth.pipeline import command_generate

    return command_generate(args, console)


def _command_pgkd(args: argparse.Namespace, console: Console) -> int:
    from distill.pgkd import command_pgkd

    return command_pgkd(args, console)


def _command_serve(args: argparse.Namespace, console: Console) -> int:
    from distill.serve.cli import command_serve

    return command_serve(args, console)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    handlers = {
        "run": _command_run,
        "compare": _command_compare,
        "cka": _command_cka,
        "report": _command_report,
        "list": _command_list,
        "validate": _command_validate,
        "search-student": _command_search,
        "cache-teacher": _command_cache_teacher,
        "cache": _command_cache,
        "select-data": _command_select,
        "active": _command_active,
        "serve": _command_serve,
        "pgkd": _command_pgkd,
        "generate": _command_generate,
    }
    from distill.config import ConfigError

    try:
        return handlers[args.command](args, console)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: continue with --resume")
        return 130
    except (FileNotFoundError, ImportError, ValueError, LookupError) as error:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
