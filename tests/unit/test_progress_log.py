"""Progress lines for CI logs: timestamps, elapsed time, ETA, and few lines per stage."""

from __future__ import annotations

import re

from prune_cli.console.progress_log import PlainProgress, seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _progress(lines, clock, **kw):
    return PlainProgress(lines.append, monotonic=clock, wall=lambda: 1_700_000_000.0 + clock.now, **kw)


def test_an_80_block_walk_prints_a_dozen_lines_not_80():
    lines, clock = [], Clock()
    progress = _progress(lines, clock)
    progress.start("calibration", "calibrating + pruning blocks", 80)
    for block in range(80):
        clock.now += 3.0  # a block every 3 s: 240 s in all
        progress.advance("calibration", 1, f"block {block}")
    progress.finish("calibration")
    assert 3 <= len(lines) <= 12, lines
    assert lines[0].endswith("calibrating + pruning blocks 0/80 ...")
    assert lines[-1].endswith("calibrating + pruning blocks done in 4m00s")
    middle = lines[1:-1]
    assert all(re.match(r"\[prune-cli\] \d\d:\d\d:\d\d \+\S+ calibrating \+ pruning blocks \d+/80 \(\d+%\) \S+, ETA \S+: block \d+$", l)
               for l in middle), middle
    # the ETA is the remaining fraction of the elapsed time: at 10% after 24 s, 216 s remain
    first = middle[0]
    done = int(re.search(r" (\d+)/80", first).group(1))
    assert f"ETA {seconds(3.0 * done * (80 - done) / done)}" in first


def test_a_slow_stage_still_shows_it_is_alive():
    lines, clock = [], Clock()
    progress = _progress(lines, clock, heartbeat=60.0)
    progress.start("calibration", "blocks", 1000)
    for _ in range(5):
        clock.now += 70.0  # each block slower than the heartbeat, under a tenth of the walk
        progress.advance("calibration")
    assert len(lines) == 1 + 5


def test_lines_are_at_least_min_interval_apart_within_a_stage():
    lines, clock = [], Clock()
    progress = _progress(lines, clock, min_interval=5.0)
    progress.start("eval", "perplexity", 10)
    for _ in range(10):
        clock.now += 0.1  # a fast walk: every tenth crossed within a second
        progress.advance("eval")
    progress.finish("eval")
    assert len(lines) == 2  # start and done only


def test_durations_read_well():
    assert seconds(41.24) == "41.2s" and seconds(185) == "3m05s" and seconds(3720) == "1h02m"
