"""Optimizers and learning-rate schedules, registered by name.

An optimizer builder takes ``params`` (iterable of parameters or groups), ``lr``,
``weight_decay`` and its own keyword arguments. A schedule builder takes ``total_steps`` and
``warmup_steps`` and returns a function ``step -> multiplier of the base learning rate``; the
engine wraps it in ``torch.optim.lr_scheduler.LambdaLR`` and steps it once per optimizer step.
Every schedule starts with ``warmup_steps`` of linear warm-up from 0.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from distill.registry import OPTIMIZERS, SCHEDULERS

Schedule = Callable[[int], float]


@OPTIMIZERS.register("sgd", summary="SGD with momentum (0.9 by default) and optional Nesterov.")
def sgd(params: Iterable, *, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)


@OPTIMIZERS.register("adam", summary="Adam (Kingma & Ba 2015); weight decay added to the gradient.")
def adam(params: Iterable, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


@OPTIMIZERS.register("adamw", summary="AdamW with decoupled weight decay (Loshchilov & Hutter 2019).")
def adamw(params: Iterable, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def _warmup(step: int, warmup_steps: int) -> float | None:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return None


@SCHEDULERS.register("constant", summary="Constant learning rate after warm-up.")
def constant(*, total_steps: int, warmup_steps: int = 0) -> Schedule:
    return lambda step: _warmup(step, warmup_steps) or 1.0


@SCHEDULERS.register("cosine", summary="Cosine decay to min_lr_ratio * lr after warm-up (Loshchilov & Hutter 2017).")
def cosine(*, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Schedule:
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


@SCHEDULERS.register("linear", summary="Linear decay to min_lr_ratio * lr after warm-up.")
def linear(*, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> Schedule:
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return schedule


@SCHEDULERS.register("multistep", summary="Multiply lr by gamma at each fraction of training in milestones.")
def multistep(
    *, total_steps: int, warmup_steps: int = 0, milestones: list[float] = (0.5, 0.75), gamma: float = 0.1
) -> Schedule:
    boundaries = sorted(int(round(m * total_steps)) for m in milestones)

    def schedule(step: int) -> float:
        warm = _warmup(step, warmup_steps)
        if warm is not None:
            return warm
        return gamma ** sum(step >= b for b in boundaries)

    return schedule


def build_optimizer(spec, parameters: Iterable) -> torch.optim.Optimizer:
    """An optimizer from an :class:`~distill.config.schema.OptimizerSpec`."""
    return OPTIMIZERS.build(spec.name, params=parameters, lr=spec.lr, weight_decay=spec.weight_decay, **spec.params)


def build_scheduler(spec, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` from a :class:`~distill.config.schema.SchedulerSpec`, stepped once per optimizer step."""
    warmup_steps = spec.warmup_steps or int(round(spec.warmup_ratio * total_steps))
    schedule = SCHEDULERS.build(spec.name, total_steps=total_steps, warmup_steps=warmup_steps, **spec.params)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
