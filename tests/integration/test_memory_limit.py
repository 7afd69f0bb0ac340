"""A checkpoint larger than a hard memory limit compresses inside that limit (a Linux memory
cgroup made by the test), and its output loads in plain transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.random_checkpoints import write_random_llama
from tests.tiny_models import tiny_tokenizer

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
LIMIT = 700 * 2**20


def _cgroup(tmp_name: str) -> Path:
    """A fresh v1 memory cgroup, or skip with the reason."""
    if not (CGROUP_V1 / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = CGROUP_V1 / tmp_name
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup ({exc.strerror}): needs root and a writable controller")
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        try:
            swap.write_text(str(LIMIT))
        except OSError:
            pass
    return group


def test_a_checkpoint_larger_than_the_memory_limit_compresses_within_it(tmp_path):
    big = tmp_path / "big"
    size = write_random_llama(big, layers=40, hidden=1024, intermediate=2816, heads=16, kv_heads=4,
                              tokenizer=tiny_tokenizer(), tie=True, max_shard_bytes=256 * 2**20)
    assert size > LIMIT * 1.2  # the weights alone do not fit, let alone in float32
    group = _cgroup(f"prune-cli-test-{os.getpid()}")
    out = tmp_path / "out"
    cli = str(Path(sys.executable).with_name("prune-cli"))
    command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', cli, "compress", str(big),
               "--method", "wanda", "--sparsity", "0.5", "--calib-samples", "2", "--seqlen", "32",
               "--eval-windows", "1", "--eval-seqlen", "32", "--device", "cpu", "-o", str(out), "--json"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   # as on a clean machine: the dense baseline is computed, not read
                                   "PRUNE_CLI_CACHE": str(tmp_path / "cache")})
        peak = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        try:
            group.rmdir()
        except OSError:
            pass
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert peak <= LIMIT
    report = json.loads(proc.stdout)
    assert report["streamed"] and report["save_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.model.layers[39].mlp.down_proj.weight
    assert layer.dtype == torch.bfloat16 and float((layer == 0).float().mean()) == 0.5
