"""A run killed with SIGKILL partway and resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from distill.engine.checkpoint import list_checkpoints
from distill.io import read_jsonl as read_metrics
from tests.conftest import ROOT, tiny_experiment, write_yaml


def _experiment(output_dir: Path) -> dict:
    experiment = tiny_experiment(output_dir)
    experiment["data"]["augment"] = {"random_crop": 1}  # augmentation randomness must resume too
    experiment["models"]["student"]["params"]["dropout"] = 0.2  # and the global RNG (dropout)
    experiment["training"]["epochs"] = 3
    experiment["scheduler"] = {"name": "cosine", "warmup_steps": 3}
    experiment["checkpoint"] = {"every_steps": 4, "keep_last": 2}
    experiment["logging"] = {"every_steps": 1}
    return experiment


def _distill(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args, "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {stage: load_file(str(run_dir / "stages" / stage / "model.safetensors")) for stage in ("teacher", "distilled")}


def test_killed_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    # the uninterrupted reference
    reference_config = write_yaml(tmp_path / "reference.yaml", _experiment(tmp_path / "reference"))
    done = _distill("run", str(reference_config))
    output, _ = done.communicate(timeout=300)
    assert done.returncode == 0, output
    [reference_dir] = (tmp_path / "reference" / "tiny").iterdir()

    # the same experiment, killed by SIGKILL in the distillation stage, 3 steps after a checkpoint
    config = write_yaml(tmp_path / "killed.yaml", _experiment(tmp_path / "killed"))
    process = _distill("run", str(config))
    kill_after_step = 11  # checkpoints at 4 and 8 of this stage: the kill loses steps 9-11
    deadline = time.time() + 300
    run_dir = None
    while time.time() < deadline:
        runs = list((tmp_path / "killed" / "tiny").glob("*")) if (tmp_path / "killed" / "tiny").exists() else []
        if runs:
            run_dir = runs[0]
            records = read_metrics(run_dir / "metrics.jsonl")
            if any(r["kind"] == "train" and r["stage"] == "distilled" and r["step"] >= kill_after_step for r in records):
                break
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert run_dir is not None and not (run_dir / "stages" / "distilled").exists()
    checkpoints = list_checkpoints(run_dir / "checkpoints" / "distilled")
    assert checkpoints, "no checkpoint was written before the kill"
    last_checkpoint_step = int(checkpoints[-1].name.split("-")[1])
    assert last_checkpoint_step < kill_after_step + 2

    resumed = _distill("run", "--resume", str(run_dir))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "resumed from step-" in output
    assert "stage 'teacher': already finished in this run folder, skipped" in output

    expected, actual = _final_weights(reference_dir), _final_weights(run_dir)
    for stage in expected:
        assert expected[stage].keys() == actual[stage].keys()
        for name in expected[stage]:
            assert torch.equal(expected[stage][name], actual[stage][name]), f"{stage}: {name} differs after resume"

    # the log reads as if the run had never stopped: no step twice, none missing, same values
    def train_log(path: Path) -> list[tuple]:
        return [(r["stage"], r["step"], r["loss"]) for r in read_metrics(path / "metrics.jsonl") if r["kind"] == "train"]

    assert train_log(run_dir) == train_log(reference_dir)
    final = json.loads((run_dir / "final.json").read_text())["rows"]
    reference_final = json.loads((reference_dir / "final.json").read_text())["rows"]
    assert [r["test"] for r in final] == [r["test"] for r in reference_final]


def test_resume_of_the_latest_run_by_experiment_file(tmp_path: Path) -> None:
    experiment = _experiment(tmp_path / "runs")
    experiment["stages"] = experiment["stages"][:1]
    experiment["training"]["epochs"] = 1
    config = write_yaml(tmp_path / "exp.yaml", experiment)
    first = _distill("run", str(config))
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    again = _distill("run", str(config), "--resume")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert "already finished in this run folder, skipped" in output
    assert len(list((tmp_path / "runs" / "tiny").iterdir())) == 1
