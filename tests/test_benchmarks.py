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
