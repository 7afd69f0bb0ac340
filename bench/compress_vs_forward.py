"""Wanda compress vs. the floor of any calibrated method, on the bundled model.

Floor: two dense forward passes of the same calibration windows through the decoder blocks
(one to collect statistics, one to propagate). Ours: ``calibrate_and_prune`` with Wanda —
capturing block inputs, statistics, pruning and propagation through all blocks.

    python bench/compress_vs_forward.py [--samples 32] [--seqlen 512] [--repeats 1]

Prints each measurement and the ratio ours / floor (goal: <= 1.2). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from bundled_setup import add_window_flags, load_bundled  # noqa: E402

from prune_cli.calibrators import layerwise  # noqa: E402
from prune_cli.model.structure import decoder_blocks  # noqa: E402
from prune_cli.recipe.config import resolve  # noqa: E402
from prune_cli.recipe.plan import build_plan  # noqa: E402
from prune_cli.stages.pruning import calibrate_and_prune  # noqa: E402


@torch.no_grad()
def floor_seconds(model, windows, batch_size) -> float:
    blocks = decoder_blocks(model).modules
    batches = layerwise.capture_block_inputs(model, blocks, windows, batch_size, torch.device("cpu"))
    start = time.perf_counter()
    for block in blocks:
        for batch in batches:  # pass 1: what statistics need
            block(batch.hidden, *batch.args, **batch.kwargs)
        layerwise.propagate(block, batches)  # pass 2: next block's inputs
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_flags(parser, evaluation=False, threads=False)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    bundled = load_bundled(args)
    model, windows = bundled.model, bundled.cal
    config = resolve(None, {"method": "wanda", "sparsity": 0.5})
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    floors, ours = [], []
    for _ in range(args.repeats):
        model.load_state_dict(dense_state)
        floors.append(floor_seconds(model, windows, args.batch_size))
        print(f"floor (2 dense block forwards): {floors[-1]:.2f} s", flush=True)
        plan = build_plan(model, config)
        start = time.perf_counter()
        calibrate_and_prune(model, plan, windows, args.batch_size, torch.device("cpu"))
        ours.append(time.perf_counter() - start)
        print(f"prune-cli wanda 50% calibration: {ours[-1]:.2f} s", flush=True)
    floor, mine = statistics.median(floors), statistics.median(ours)
    print(f"windows {args.samples}x{args.seqlen}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    print(f"floor median {floor:.2f} s (min {min(floors):.2f}, max {max(floors):.2f})")
    print(f"ours  median {mine:.2f} s (min {min(ours):.2f}, max {max(ours):.2f})")
    print(f"ratio ours/floor = {mine / floor:.3f}  (goal <= 1.2)")


if __name__ == "__main__":
    main()
