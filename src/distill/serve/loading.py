"""Which model ``distill serve`` serves: a model source, or a stage of a finished ``distill run``.

A model source is anything :mod:`distill.models.causal_lm` reads: a built-in alias
(``smollm2-135m-instruct``), a ``.gguf`` file, a local Hugging Face folder or a hub id. A run
folder (one holding the resolved ``config.yaml``) serves the student a stage trained, rebuilt from
the run's config and loaded strictly from ``stages/<stage>/model.safetensors`` after its manifest
verifies, with the tokenizer of the run's data (``data.params.tokenizer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _device(device: str) -> torch.device:
    try:
        chosen = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"unknown device '{device}' ({error}); use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' was asked for, but no CUDA device is available; use --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device '{device}' was asked for, but MPS is not available; use --device cpu")
    return chosen


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``distill run`` (it holds the resolved config)."""
    from distill.engine.runner import CONFIG_FILE

    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / CONFIG_FILE).is_file()


def finished_stages(run_dir: Path, stage_names: list[str]) -> dict[str, str | None]:
    """Each stage of a run -> None when it finished (weights present, manifest verifies), else why not."""
    from distill.engine.checkpoint import CheckpointError, verify_folder
    from distill.engine.context import STAGE_SUMMARY, STAGE_WEIGHTS

    status: dict[str, str | None] = {}
    for name in stage_names:
        folder = run_dir / "stages" / name
        if not (folder / STAGE_WEIGHTS).is_file() or not (folder / STAGE_SUMMARY).is_file():
            status[name] = f"no {STAGE_WEIGHTS} in {folder}"
            continue
        try:
            verify_folder(folder)
        except CheckpointError as error:
            status[name] = str(error)
            continue
        status[name] = None
    return status


def _run_model(run_dir: Path, stage: str | None, trust_remote_code: bool) -> tuple[torch.nn.Module, Any, str]:
    from distill.config import ConfigError, load_experiment
    from distill.engine.batches import derive_seed
    from distill.engine.context import STAGE_WEIGHTS
    from distill.engine.runner import CONFIG_FILE
    from distill.models.build import build_model, load_weights
    from distill.models.causal_lm import CausalLM, load_tokenizer

    experiment = load_experiment(run_dir / CONFIG_FILE)
    names = [spec.name for spec in experiment.stages]
    status = finished_stages(run_dir, names)
    if stage is None:
        done = [name for name in names if status[name] is None]
        if not done:
            listing = "; ".join(f"{name}: {why}" for name, why in status.items())
            raise ConfigError([f"no stage of the run {run_dir} has finished, so there is no student to serve ({listing})"])
        stage = done[-1]
    elif stage not in status:
        raise ConfigError([f"stage '{stage}' is not a stage of the run {run_dir}; its stages are: {', '.join(names)}"])
    elif status[stage] is not None:
        raise ConfigError([f"stage '{stage}' has not finished in {run_dir}: {status[stage]}"])
    spec = experiment.stage(stage)
    model_spec = experiment.models[spec.model]
    tokenizer_source = experiment.data.params.get("tokenizer")
    if not isinstance(tokenizer_source, str) or not tokenizer_source:
        raise ConfigError([
            f"the run's data set '{experiment.data.dataset}' names no tokenizer (data.params.tokenizer), so the "
            f"text of stage '{stage}' cannot be encoded; distill serve needs a language-model run"
        ])
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(experiment.seed, "init", spec.model))
        model = build_model(model_spec, num_classes=len(tokenizer), input_shape=(1,))
    if not isinstance(model, CausalLM):
        raise ValueError(
            f"stage '{stage}' trains models.{spec.model} (arch '{model_spec.arch}'), which is not a causal language "
            "model; distill serve serves hf_causal_lm models"
        )
    load_weights(model, run_dir / "stages" / stage / STAGE_WEIGHTS)
    return model.model, tokenizer, f"{run_dir.name}:{stage}"


def _served_name(model: str, gguf_file: str | None) -> str:
    from distill.models.causal_lm import ALIASES

    if model.lower() in ALIASES:
        return model.lower()
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        return path.stem
    if path.is_dir():
        folder = path.resolve().name
        return f"{folder}/{Path(gguf_file).stem}" if gguf_file else folder
    return model


def load_served_model(
    model: str,
    *,
    stage: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any, str]:
    """The Hugging Face causal LM (eval mode, on ``device``), its tokenizer and its served name.

    ``model`` is a model source (alias, ``.gguf`` file, Hugging Face folder or hub id; named by the
    alias, the file's stem, the folder's name or the hub id) or a run folder of ``distill run``
    (named ``<run folder>:<stage>``), in which case ``stage`` picks the stage whose student is
    served (default: the last stage that finished). Raises ``FileNotFoundError`` for a missing
    source, ``ConfigError`` for an unusable run folder or stage, and ``ValueError`` for a model
    that is not a causal language model.
    """
    from distill.models.causal_lm import hf_causal_lm, load_tokenizer

    if not isinstance(model, str) or not model:
        raise ValueError(f"the model to serve must be a non-empty string, got {model!r}")
    target = _device(device)
    if is_run_folder(model):
        if gguf_file is not None:
            raise ValueError(f"gguf_file names a file of a model source; '{model}' is a run folder")
        hf_model, tokenizer, name = _run_model(Path(model).expanduser(), stage, trust_remote_code)
    else:
        from distill.engine.runner import CONFIG_FILE

        path = Path(model).expanduser()
        if stage is not None:
            raise ValueError(
                f"--stage picks a stage of a run folder, but '{model}' is not one (no {CONFIG_FILE} in it)"
            )
        if path.is_dir() and gguf_file is None and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"'{model}' is neither a run folder of distill run (no {CONFIG_FILE}) nor a Hugging Face model "
                "folder (no config.json); give a run folder, a model folder, a .gguf file, an alias or a hub id"
            )
        try:
            tokenizer = load_tokenizer(model, gguf_file, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(f"cannot load a tokenizer from '{model}': {error}") from error
        try:
            wrapped = hf_causal_lm(num_classes=len(tokenizer), source=model, gguf_file=gguf_file,
                                   trust_remote_code=trust_remote_code)
        except ValueError as error:
            if "Unrecognized configuration class" in str(error) or "AutoModelForCausalLM" in str(error):
                raise ValueError(f"'{model}' is not a causal language model: {error}") from error
            raise
        except OSError as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(f"cannot load a causal language model from '{model}': {error}") from error
        hf_model, name = wrapped.model, _served_name(model, gguf_file)
    hf_model.to(target).eval()
    hf_model.requires_grad_(False)
    return hf_model, tokenizer, name
