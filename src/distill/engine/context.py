"""What every part of a run shares: the experiment, its folder, the data, the processes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.config.schema import Experiment, StageSpec
from distill.data.base import ArraySplit, DataBundle
from distill.engine.batches import derive_seed, local_slice
from distill.engine.callbacks import CallbackList
from distill.engine.checkpoint import CheckpointError, verify_folder
from distill.io import atomic_write_text, read_jsonl
from distill.models.build import build_model, load_weights

STAGE_WEIGHTS = "model.safetensors"
STAGE_SUMMARY = "summary.json"


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, appended by the main process."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def keep(self, predicate: Any) -> None:
        """Rewrite the log keeping only the records for which ``predicate(record)`` is true."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read() if predicate(r)]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


@dataclass
class RunContext:
    experiment: Experiment
    run_dir: Path
    data: DataBundle
    accelerator: Any
    callbacks: CallbackList
    log: MetricsLog
    reuse_dirs: list[Path] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    stage_data: dict[str, DataBundle] = field(default_factory=dict)  # stages with their own `data`

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / name

    def stage_done(self, name: str) -> bool:
        folder = self.stage_dir(name)
        if not (folder / STAGE_SUMMARY).exists():
            return False
        try:
            verify_folder(folder)
        except CheckpointError:
            return False
        return True

    def stage_summary(self, name: str) -> dict[str, Any]:
        return json.loads((self.stage_dir(name) / STAGE_SUMMARY).read_text())

    def build_network(self, model_key: str, copy: int = 0) -> torch.nn.Module:
        """A fresh network of ``models[model_key]``; its initialization depends on (seed, key) only.

        So two stages training the same model key (a student from scratch and by distillation)
        start from identical weights, which makes their comparison fair. ``copy`` > 0 gives
        another, equally reproducible initialization (several copies of one key trained together).
        """
        spec = self.experiment.models[model_key]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.experiment.seed, "init", model_key, *((copy,) if copy else ())))
            return build_model(spec, num_classes=self.data.num_classes, input_shape=self.data.input_shape)

    def stage_model(self, stage_name: str) -> torch.nn.Module:
        """The network a finished stage produced."""
        stage = self.experiment.stage(stage_name)
        model = self.build_network(stage.model)
        load_weights(model, self.stage_dir(stage_name) / STAGE_WEIGHTS)
        return model

    def is_stage_teacher(self, name: str, before: int | None = None) -> bool:
        """Whether ``name`` names a stage among the first ``before`` stages (all when None).

        A teacher reference means an earlier stage when one has that name, else a `models`
        key: the same rule the config validation applies.
        """
        stages = self.experiment.stages if before is None else self.experiment.stages[:before]
        return any(stage.name == name for stage in stages)

    def frozen(self, reference: str, before: int | None = None) -> torch.nn.Module:
        """A teacher in eval mode, without gradients: a stage's model, or a `models` entry.

        ``before`` limits the stages ``reference`` may name to the first ``before`` ones.
        """
        if self.is_stage_teacher(reference, before):
            model = self.stage_model(reference)
        else:
            model = self.build_network(reference)
        model.eval().requires_grad_(False)
        return model.to(self.device)

    def teacher_of(self, stage: StageSpec) -> torch.nn.Module | None:
        """The stage's frozen teacher, or a :class:`TeacherEnsemble` of its `teachers`, or None."""
        before = self.experiment.stages.index(stage)
        if stage.teachers:
            return self.ensemble_of(stage, before)
        if stage.teacher is None:
            return None
        return self.frozen(stage.teacher, before=before)

    def ensemble_of(self, stage: StageSpec, before: int) -> torch.nn.Module:
        """The teachers of a multi-teacher stage, combined as its `combine` section says."""
        from distill.engine.teachers import TeacherEnsemble

        models = []
        for entry in stage.teachers or []:
            model = self.frozen(entry.model, before=before)
            models.append(model.to("cpu") if stage.combine.offload else model)
        return TeacherEnsemble.for_stage(stage, models, device=self.device)


@torch.inference_mode()
def predict(
    model: torch.nn.Module, split: ArraySplit, batch_size: int, context: RunContext, autocast_dtype: Any = None
) -> torch.Tensor:
    """Logits ``[N, C]`` (float32, CPU) of ``model`` on a whole split, sharded over processes."""
    was_training = model.training
    model.eval()
    indices = local_slice(torch.arange(len(split)), context.world_size, context.rank)
    outputs = []
    for chunk in torch.split(indices, batch_size):
        inputs = split.inputs[chunk].to(context.device)
        with torch.autocast(context.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            outputs.append(model(inputs).float().cpu())
    model.train(was_training)
    local = torch.cat(outputs) if outputs else torch.empty(0)
    if context.world_size == 1:
        return local
    gathered: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, local)
    return torch.cat([g for g in gathered if g.numel()])


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_summary() -> dict[str, Any]:
    """What a report records about the machine the run used."""
    import platform

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
