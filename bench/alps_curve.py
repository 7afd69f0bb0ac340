"""ALPS's quality/time curve on one block of the bundled model: the layer error each setting of
the ADMM iteration cap and of the conjugate-gradient steps reaches, and what it costs.

    python bench/alps_curve.py [--block 10] [--samples 32] [--seqlen 512]
        [--levels 50% 60% 70% 2:4] [--max-iter 6 12 21 300] [--pcg-steps 0 3 10] [--json FILE]

The inputs of every Linear of block ``--block`` are captured over the calibration windows (the
seed-0 windows ``prune-cli compress`` draws, fp32) and summed into the Gram matrix ``X^T X``
SparseGPT and ALPS share. For each Linear and pattern ALPS is run once per setting (default
schedule otherwise; ``max_iter 300`` is the default, which the schedule's stopping rule ends
first) and prints the relative layer error ``||(W - What) X^T||^2 / ||W X^T||^2`` as a ratio
to the default setting's, the solve's time, and SparseGPT's error on the same statistics.
Times are per Linear on this process's threads: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from bundled_setup import add_window_flags, load_bundled  # noqa: E402

from prune_cli.calibrators.stats import InputStats, Stat  # noqa: E402
from prune_cli.core.patterns import parse_pattern  # noqa: E402
from prune_cli.methods.alps import ALPS, relative_error  # noqa: E402
from prune_cli.methods.sparsegpt import SparseGPT  # noqa: E402
from prune_cli.model.structure import block_linears, decoder_blocks  # noqa: E402

LEVELS = {"50%": (None, 0.5), "60%": (None, 0.6), "70%": (None, 0.7), "2:4": ("2:4", None)}


def capture(model: torch.nn.Module, block: int, windows: torch.Tensor, batch: int = 4) -> dict[str, tuple]:
    """``{linear name: (weight, InputStats with the Gram matrix)}`` of block ``block``'s Linears."""
    linears = block_linears(decoder_blocks(model).modules[block])
    stats = {name: InputStats(m.in_features, frozenset({Stat.GRAM})) for name, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=name: stats[n].update(a[0])) for name, m in linears.items()]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                model(windows[start : start + batch])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (linears[name].weight.detach().float().clone(), stats[name]) for name in linears}


def timed(method, weight: torch.Tensor, stats: InputStats, pattern) -> tuple[float, object]:
    start = time.perf_counter()
    result = method.prune(weight, stats, pattern)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_flags(parser, evaluation=False)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--max-iter", nargs="+", type=int, default=[6, 12, 21, 300])
    parser.add_argument("--pcg-steps", nargs="+", type=int, default=[0, 3, 10])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    bundled = load_bundled(args)
    layers = capture(bundled.model, args.block, bundled.cal)
    default = ALPS()
    settings = [("max_iter", v) for v in args.max_iter if v != default.max_iter]
    settings += [("pcg_steps", v) for v in args.pcg_steps if v != default.pcg_steps]
    print(f"block {args.block}, calibration {args.samples}x{args.seqlen} (seed 0), threads {torch.get_num_threads()}; "
          f"errors as a ratio to the default schedule's (max_iter {default.max_iter}, pcg_steps {default.pcg_steps})")
    rows = []
    for level in args.levels:
        pattern = parse_pattern(*LEVELS[level])
        for name, (weight, stats) in layers.items():
            ALPS().prune(weight, stats, pattern)  # the eigendecomposition, cached for every run below
            base_s, base = timed(default, weight, stats, pattern)
            sgpt = relative_error(weight, SparseGPT().prune(weight, stats, pattern).weight, stats.xtx)
            row = {"level": level, "linear": name, "shape": list(weight.shape), "iterations": base.info["iterations"],
                   "objective": base.info["objective"], "seconds": base_s, "vs_sparsegpt": base.info["objective"] / sgpt,
                   "settings": {}}
            for key, value in settings:
                seconds, result = timed(ALPS(**{key: value}), weight, stats, pattern)
                row["settings"][f"{key}={value}"] = {"error_ratio": result.info["objective"] / base.info["objective"],
                                                     "time_ratio": seconds / base_s}
            rows.append(row)
            cells = "  ".join(f"{k} {v['error_ratio']:.4f} ({v['time_ratio']:.2f}x time)" for k, v in row["settings"].items())
            print(f"{level:4} {name:18} {str(tuple(weight.shape)):12} {base_s:5.2f} s, {row['iterations']} it, "
                  f"error {row['objective']:.5f} = {row['vs_sparsegpt']:.3f}x SparseGPT | {cells}", flush=True)
    print("median over Linears and levels (error ratio to the default; time ratio):")
    for key, value in settings:
        label = f"{key}={value}"
        errors = [r["settings"][label]["error_ratio"] for r in rows]
        times = [r["settings"][label]["time_ratio"] for r in rows]
        print(f"  {label:14} error {statistics.median(errors):.4f} ({min(errors):.4f}-{max(errors):.4f})  "
              f"time {statistics.median(times):.2f}x ({min(times):.2f}-{max(times):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"setup": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
