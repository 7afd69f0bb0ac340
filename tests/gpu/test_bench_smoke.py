"""The GPU benchmarks run on the lent GPU machine only, where a broken script costs device time:
their ``--smoke`` mode (a CPU, torch standing in for CuPy) checks them here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, tmp_path: Path, returncode: int = 0) -> subprocess.CompletedProcess:
    """``bench/<script> <args>`` with CUDA hidden, in ``tmp_path``; asserts its exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def test_gpu_kernels_smoke(tmp_path):
    proc = run_bench("gpu_kernels.py", "--smoke", "--json", str(tmp_path / "k.json"), tmp_path=tmp_path)
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"input_stats", "dsnot_swap"} <= kernels, kernels
    assert all(r["check"] == "equal" or r["check"].startswith("rel ") for r in rows), [r["check"] for r in rows]
    assert not [n for r in rows for n in r["notes"] if n.startswith("failed")]
    assert "smoke run" in proc.stdout


@pytest.mark.slow  # 13 s
def test_gpu_compress_smoke(tmp_path):
    run_bench("gpu_compress.py", "--smoke", "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"),
              tmp_path=tmp_path)
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    recipes = {r["recipe"] for r in results}
    assert recipes == {"wanda-50", "wanda-2of4", "dsnot-wanda-60", "wina-greedy-50"}
    assert len(results) == 2 * len(recipes)
    for first, second in zip(results[::2], results[1::2]):  # torch vs torch: nothing may differ
        assert first["recipe"] == second["recipe"] and second["differs"] == "equal"
        assert first["ppl_compressed"] == second["ppl_compressed"] and first["ppl_compressed"] > 1
    assert "| wanda-50 | torch |" in (tmp_path / "c.md").read_text()


def test_gpu_compress_refuses_without_cuda(tmp_path):
    proc = run_bench("gpu_compress.py", "--recipes", "wanda-50", tmp_path=tmp_path, returncode=2)
    assert "no CUDA device" in proc.stderr


def _streamed_check(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_streamed_check.py"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 13 s
def test_gpu_streamed_check_smoke(tmp_path):
    """gpu_check.sh's --device cuda compress/eval step, with the CPU on both sides."""
    proc = _streamed_check("--smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    assert len(rows) == 5 and all("FAILED" not in r and r.endswith("| 1.00000 |") for r in rows), proc.stdout


def test_gpu_streamed_check_refuses_without_cuda(tmp_path):
    proc = _streamed_check(tmp_path=tmp_path)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
