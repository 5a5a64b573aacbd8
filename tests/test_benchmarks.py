"""The benchmark scripts keep working (run at a tiny size; the real figures are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_loss_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--rows", "32", "--classes", "50",
         "--repeats", "1", "--coupled-rows", "16", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ratio_to_forward_kl"]["forward_kl"] == 1.0
    assert {"hinton_kd", "dkd", "taid", "dual_head_kd", "tgeo_kd", "sinkhorn"} <= set(result["seconds"])
    assert result["measured_at_rows"]["sinkhorn"] == 16 and result["measured_at_rows"]["dkd"] == 32
    assert "vs forward_kl" in completed.stdout


def test_chunked_loss_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "chunked.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cases = "floor,naive_kl,trl_jsd,liger_jsd_eager,ours_kl,ours_jsd"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chunked_loss.py"), "--shapes", "64x16x300", "--repeats", "1",
         "--cases", cases, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    [shape] = json.loads(out.read_text())["shapes"]
    rows = {row["case"]: row for row in shape["rows"]}
    assert set(rows) == set(cases.split(","))
    assert all("seconds" in row for row in rows.values()), rows
    assert rows["ours_kl"]["vs_floor"] > 0 and "floor" in completed.stdout
    # the same quantity: our generalized JSD and TRL's on the same inputs
    assert abs(rows["ours_jsd"]["value"] - rows["trl_jsd"]["value"]) < 1e-5 * abs(rows["trl_jsd"]["value"]) + 1e-7


def test_multi_teacher_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multi_teacher.py"), "--rows", "200", "--steps", "2",
         "--batch-size", "16", "--threads", "1", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads((tmp_path / "multi_teacher.json").read_text())
    assert set(result["results"]) == {"live", "precompute"}
    assert result["results"]["precompute"]["teacher_params_in_memory"] == 0
    assert result["results"]["live"]["teacher_params_in_memory"] > 800_000
    assert "| precompute |" in completed.stdout
