"""benchmarks/gpu_smoke.py runs its own code end to end on a CPU (SDPA only), and skips
cleanly without CUDA: the GPU matrix itself cannot run here (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_dry_run_on_cpu_reports_every_cache_mode(tmp_path) -> None:
    out = tmp_path / "smoke.json"
    done = _run("--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["kv_cache"]) for r in rows] == [
        ("sdpa", "none"),
        ("sdpa", "prefix"),
        ("sdpa", "dual"),
    ]
    assert all(r["identical"] == r["requests"] and not r["errors"] for r in rows)
    assert all(r["ops_per_step"] > 0 and r["reads_per_step"] > 0 for r in rows)
    filtering = json.loads(out.read_text())["row_filtering"]
    assert [r["dtype"] for r in filtering] == ["float32", "float64", "bfloat16", "float16"]
    assert all(r["rows"] > 0 and r["differ"] == 0 for r in filtering)


def test_without_cuda_it_says_it_skipped() -> None:
    if torch.cuda.is_available():  # a GPU machine runs the real matrix instead
        return
    done = _run()
    assert done.returncode == 0 and "skipped" in done.stdout
