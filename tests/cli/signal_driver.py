"""Runs the real ``prune-cli`` entry point with one stage paused, for the kill tests.

    python -m tests.cli.signal_driver STAGE FLAG_FILE -- prune-cli arguments...

When the run reaches STAGE it writes its PID to FLAG_FILE and sleeps, so the test can send a
signal at a known point. Stages: ``load`` (weights loaded), ``calibration`` (first block
propagated), ``export`` (weights and tokenizer written into the staging folder, report not
yet), ``swap`` (an ``--overwrite`` has moved the previous checkpoint aside and not yet moved the
new one in; SIGINT/SIGTERM are held there, so only SIGKILL lands).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _pause(flag: str) -> None:
    Path(flag).write_text(str(os.getpid()))
    time.sleep(120)


def _patch(stage: str, flag: str) -> None:
    if stage == "load":
        import prune_cli.pipeline as pipeline

        original = pipeline.open_model

        def load_then_pause(*args, **kwargs):
            result = original(*args, **kwargs)
            _pause(flag)
            return result

        pipeline.open_model = load_then_pause
    elif stage == "calibration":
        from prune_cli.calibrators import layerwise

        original = layerwise.propagate

        def propagate_then_pause(*args, **kwargs):
            result = original(*args, **kwargs)
            _pause(flag)
            return result

        layerwise.propagate = propagate_then_pause
    elif stage == "export":
        import prune_cli.export as export

        original = export.fix_modes

        def fix_modes_then_pause(folder):
            original(folder)
            _pause(flag)

        export.fix_modes = fix_modes_then_pause
    elif stage == "swap":
        import prune_cli.output as output

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
