"""Freed memory goes back to the system under a tight memory limit.

A CLI run keeps freed memory in glibc's heap on purpose (prune_cli.core.allocator: no mmap-ed
blocks, the heap top never trimmed), so a streamed run's resident memory stayed at the
high-water mark of its transients, well past its live data: on a 40-block
model in a 700 MiB cgroup the live heap peaked at 364 MiB while the resident anonymous memory
reached 620-660 MiB, and the run was killed once on a clean machine
(tests/integration/test_memory_limit.py). The driver now trims the allocator at the start of a
walk and after each streamed block whenever resident memory is above half the limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from prune_cli.core import memory
from prune_cli.core.memory import FreedMemory, release_freed_memory, resident_anonymous_bytes
from prune_cli.model.source import ModelSource
from prune_cli.streaming.driver import BlockDriver, Stage
from prune_cli.streaming.loader import load_model
from tests.unit.test_driver import llama3, opened  # noqa: F401 - the module fixture is shared

needs_glibc_trim = pytest.mark.skipif(
    memory._malloc_trim() is None or resident_anonymous_bytes() is None,
    reason="needs glibc's malloc_trim and /proc/self/status (Linux with glibc)")


@needs_glibc_trim
def test_freed_mid_sized_tensors_stay_resident_until_released():
    """In a fresh interpreter set up as the CLI sets its allocator: 20 tensors of 11 MiB freed
    between live ones stay resident; :func:`release_freed_memory` hands at least 150 of their
    220 MiB back."""
    script = textwrap.dedent("""
        import torch
        from prune_cli.core.allocator import keep_freed_memory
        from prune_cli.core.memory import release_freed_memory, resident_anonymous_bytes
        assert keep_freed_memory()
        MiB = 2**20
        fill = lambda n: torch.ones(n // 4)
        kept, freed = [], []
        for i in range(40):
            (kept if i % 2 else freed).append(fill(11 * MiB))
            kept.append(fill(64 * 1024))
        del freed
        before = resident_anonymous_bytes()
        assert release_freed_memory()
        print(before, resident_anonymous_bytes())
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    before, after = map(int, out.split())
    assert before - after >= 150 * 2**20, (before, after)


@needs_glibc_trim
def test_trims_only_above_its_share_of_the_limit():
    tight = FreedMemory(limit=0)
    assert tight.after_block() and tight.after_block() and tight.trims == 2
    roomy = FreedMemory(limit=2**60)
    assert not roomy.after_block() and roomy.trims == 0
    assert FreedMemory(limit=1000, fraction=0.5).threshold == 500


def test_nothing_happens_where_the_allocator_cannot_trim(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    tight = FreedMemory(limit=0)
    assert not release_freed_memory()
    assert not tight.after_block() and tight.trims == 0


class _Counting:
    def __init__(self):
        self.calls = 0

    def after_block(self):
        self.calls += 1
        return False


def test_a_streamed_walk_checks_after_each_block_and_at_its_start(llama3):  # noqa: F811
    driver = opened(llama3).driver
    driver.freed_memory = counting = _Counting()
    driver.walk([Stage()])
    assert counting.calls == driver.n_blocks + 1


def test_a_resident_walk_leaves_the_allocator_alone(llama3):  # noqa: F811
    model, _ = load_model(ModelSource("folder", str(llama3)))
    driver = BlockDriver(model)
    driver.freed_memory = counting = _Counting()
    driver.walk([Stage()])
    assert counting.calls == 0
