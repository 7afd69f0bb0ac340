"""Data-parallel calibration: two CPU processes under torchrun (gloo on loopback)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prune_cli.core.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--seqlen", "32", "--eval-windows", "8", "--eval-seqlen", "32", "--device", "cpu", "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "prune_cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _reports(stdout: str) -> list[dict]:
    decoder, out, text = json.JSONDecoder(), [], stdout.strip()
    while text:
        value, end = decoder.raw_decode(text)
        out.append(value)
        text = text[end:].strip()
    return out


WANDA = ["--method", "wanda", "--sparsity", "0.5"]
SPARSEGPT_24 = ["--method", "sparsegpt", "--pattern", "2:4"]


# 15 s each on 2 cores: one case in the default suite, the other three under -m slow
@pytest.mark.parametrize("method,samples", [
    pytest.param(WANDA, 16, id="wanda-shares-fill-batches"),
    pytest.param(WANDA, 6, id="wanda-shares-cut-batches", marks=pytest.mark.slow),
    pytest.param(SPARSEGPT_24, 16, id="sparsegpt-2of4-shares-fill-batches", marks=pytest.mark.slow),
    pytest.param(SPARSEGPT_24, 6, id="sparsegpt-2of4-shares-cut-batches", marks=pytest.mark.slow),
])
def test_two_ranks_agree_bit_for_bit_and_with_one_process(tmp_path, tiny_llama_dir, method, samples):
    """16 windows in batches of 8: each rank's 8 are one of the single process's batches, and a
    two-way sum is the same addition: the same checkpoint, bit for bit. 6 windows: one batch of
    6 against two of 3, summed in another order: nearly the same."""
    single = tmp_path / "single"
    args = [*ARGS, "--calib-samples", str(samples)]
    # one thread, as each rank has: the thread count changes how a matmul sums
    result = subprocess.run([sys.executable, "-m", "prune_cli", "compress", str(tiny_llama_dir), *method, *args, "-o", str(single)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads(result.stdout)
    pair = tmp_path / "pair"
    proc = _torchrun(["compress", tiny_llama_dir, *method, *args, "-o", pair])
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(proc.stdout)
    assert len(reports) == 2
    r0, r1 = reports
    assert r0["world_size"] == 2 and r0["rank_windows"]["calibration"] == [samples // 2] * 2
    # every rank computed the same masks and weights, bit for bit
    assert [l["mask_sha256"] for l in r0["layers"]] == [l["mask_sha256"] for l in r1["layers"]]
    assert [l["weight_sha256"] for l in r0["layers"]] == [l["weight_sha256"] for l in r1["layers"]]
    assert r0["ppl"] == r1["ppl"]
    # against one process: sums in another order round differently
    ours, theirs = load_file(str(pair / "model.safetensors")), load_file(str(single / "model.safetensors"))
    agree = total = 0
    for name in ours:
        if name.endswith("proj.weight"):
            agree += int(((ours[name] == 0) == (theirs[name] == 0)).sum())
            total += ours[name].numel()
    if samples == 16:
        assert all(torch.equal(ours[k], theirs[k]) for k in ours) and r0["ppl"] == one["ppl"]
    assert agree / total >= 0.999
    assert r0["ppl"]["compressed"] == pytest.approx(one["ppl"]["compressed"], rel=5e-3)
    assert r0["ppl"]["dense"] == pytest.approx(one["ppl"]["dense"], rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair", "single"]


def test_activation_sparsity_is_refused_with_several_processes(monkeypatch):
    from types import SimpleNamespace

    from prune_cli.recipe.config import resolve
    from prune_cli.run.claim import check_data_parallel
    from prune_cli.run.job import CompressRequest

    request = CompressRequest(resolve(None, {"method": "teal", "sparsity": 0.5}), None, None)
    with pytest.raises(BadInputError, match="one process"):
        check_data_parallel(request, SimpleNamespace())  # a dense model's config
