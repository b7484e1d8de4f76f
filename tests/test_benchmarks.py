"""The GPU benchmark script still runs (its CPU smoke mode, toy sizes), so it is ready when a GPU is lent."""

import os
import subprocess
import sys
from pathlib import Path


def test_gpu_rollout_benchmark_smoke():
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_rollout.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKE_NO_PROGRESS": "1"}
    result = subprocess.run([sys.executable, str(script), "--smoke"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 4 |" in result.stdout and "decoder stage" in result.stdout and "step" in result.stdout
