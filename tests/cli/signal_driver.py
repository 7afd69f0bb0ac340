"""Runs the real ``prune-cli`` entry point with one stage paused, for the kill tests.

    python -m tests.cli.signal_driver STAGE FLAG_FILE -- prune-cli arguments...

When the run reaches STAGE it writes its PID to FLAG_FILE and sleeps, so the test can send a
signal at a known point. Stages: ``load`` (weights loaded), ``calibration`` (first block
propagated), ``export`` (weights and tokenizer written into the staging folder, report not
yet), ``resume-state`` (the first resume state of a block written), ``swap`` (an
``--overwrite`` has moved the previous checkpoint aside and not yet moved the new one in;
SIGINT/SIGTERM are held there, so only SIGKILL lands).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _pause(flag: str) -> None:
    """Sleep up to 120 s; a stop request that waits for the end of the block (prune-cli defers
    the first SIGINT / SIGTERM inside a walk) ends the pause, as the block would end."""
    from prune_cli.core import stopping

    Path(flag).write_text(str(os.getpid()))
    for _ in range(2400):
        time.sleep(0.05)
        if stopping.pending():
            return


def _patch(stage: str, flag: str) -> None:
    if stage == "load":
        import prune_cli.run.job as job

        original = job.open_model

        def load_then_pause(*args, **kwargs):
            result = original(*args, **kwargs)
            _pause(flag)
            return result

        job.open_model = load_then_pause
    elif stage == "calibration":
        from prune_cli.calibrators import layerwise

        original = layerwise.propagate

        def propagate_then_pause(*args, **kwargs):
            result = original(*args, **kwargs)
            _pause(flag)
            return result

        layerwise.propagate = propagate_then_pause
    elif stage == "export":
        import prune_cli.stages.export as export

        original = export.fix_modes

        def fix_modes_then_pause(folder):
            original(folder)
            _pause(flag)

        export.fix_modes = fix_modes_then_pause
    elif stage == "resume-state":
        from prune_cli.checkpoint.resume import ResumeState

        original = ResumeState.block_done

        def block_done_then_pause(self, *args, **kwargs):
            wrote = original(self, *args, **kwargs)
            if wrote:
                _pause(flag)
            return wrote

        ResumeState.block_done = block_done_then_pause
    elif stage == "swap":
        import prune_cli.checkpoint.output as output

        real_replace = os.replace
        calls = []

        class PausingOs:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                real_replace(src, dst)
                calls.append(dst)
                if len(calls) == 1 and Path(dst).name == "old":
                    _pause(flag)

        output.os = PausingOs()
    else:
        raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    stage, flag, sep, *args = sys.argv[1:]
    assert sep == "--"
    _patch(stage, flag)
    from prune_cli.cli import main

    main(args)
