"""Hooks through which the engine reports progress; it never prints itself.

The command line attaches a progress bar (:class:`distill.cli_progress.RichProgress`); Python users
may pass their own :class:`Callback` subclasses to :func:`distill.engine.runner.run_experiment`.
Callbacks are called on the main process only.
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Override any of these; the defaults do nothing."""

    def on_run_start(self, run_dir: str, experiment: Any) -> None: ...

    def on_stage_start(self, stage: str, total_steps: int, start_step: int, epochs: int) -> None: ...

    def on_step(self, stage: str, step: int, total_steps: int, values: dict[str, float]) -> None: ...

    def on_eval(self, stage: str, record: dict[str, Any]) -> None: ...

    def on_stage_end(self, stage: str, summary: dict[str, Any]) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_run_end(self, run_dir: str, rows: list[dict[str, Any]]) -> None: ...


class CallbackList(Callback):
    """Fans every call out to several callbacks (and to none on non-main processes)."""

    def __init__(self, callbacks: list[Callback] | tuple[Callback, ...] = (), enabled: bool = True) -> None:
        self.callbacks = list(callbacks) if enabled else []

    def _call(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(*args)

    def on_run_start(self, run_dir: str, experiment: Any) -> None:
        self._call("on_run_start", run_dir, experiment)

    def on_stage_start(self, stage: str, total_steps: int, start_step: int, epochs: int) -> None:
        self._call("on_stage_start", stage, total_steps, start_step, epochs)

    def on_step(self, stage: str, step: int, total_steps: int, values: dict[str, float]) -> None:
        self._call("on_step", stage, step, total_steps, values)

    def on_eval(self, stage: str, record: dict[str, Any]) -> None:
        self._call("on_eval", stage, record)

    def on_stage_end(self, stage: str, summary: dict[str, Any]) -> None:
        self._call("on_stage_end", stage, summary)

    def on_message(self, text: str) -> None:
        self._call("on_message", text)

    def on_run_end(self, run_dir: str, rows: list[dict[str, Any]]) -> None:
        self._call("on_run_end", run_dir, rows)
