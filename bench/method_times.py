"""Pruning time of each weight method on the bundled model, in one process on a quiet machine:
``calibrate_and_prune`` (capturing inputs, statistics, pruning, propagation) per method, and
each DSnoT variant's time relative to its base (goal: DSnoT adds at most 15%), RIA's relative
to Wanda's at the same pattern (goal: at most 1.3x, with the 2:4 channel permutation), and ALPS's
relative to SparseGPT's at the same pattern (goal: at most 2.5x).

    python bench/method_times.py [--samples 32] [--seqlen 512] [--only wanda dsnot ...] [--exclude reference]
        [--repeats 3] [--default-malloc]

Like the ``prune-cli`` entry point, it first calls :func:`prune_cli.core.allocator.keep_freed_memory`
(``--default-malloc`` to measure glibc's default behaviour instead).
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

from prune_cli.core.allocator import keep_freed_memory  # noqa: E402
from prune_cli.recipe.config import resolve  # noqa: E402
from prune_cli.recipe.plan import build_plan  # noqa: E402
from prune_cli.stages.pruning import calibrate_and_prune  # noqa: E402

RUNS = [
    ("wanda", {"method": "wanda"}, None),
    ("dsnot(wanda, reference)", {"method": "dsnot", "method_options": {"base": "wanda", "mode": "reference"}}, "wanda"),
    ("dsnot(wanda, guarded)", {"method": "dsnot", "method_options": {"base": "wanda"}}, "wanda"),
    ("sparsegpt", {"method": "sparsegpt"}, None),
    ("dsnot(sparsegpt, guarded)", {"method": "dsnot", "method_options": {"base": "sparsegpt"}}, "sparsegpt"),
    ("ria", {"method": "ria"}, "wanda"),
    ("wanda 2:4", {"method": "wanda", "pattern": "2:4", "sparsity": None}, None),
    ("ria 2:4 (permuted)", {"method": "ria", "pattern": "2:4", "sparsity": None}, "wanda 2:4"),
    ("alps", {"method": "alps"}, "sparsegpt"),
    ("sparsegpt 2:4", {"method": "sparsegpt", "pattern": "2:4", "sparsity": None}, None),
    ("alps 2:4", {"method": "alps", "pattern": "2:4", "sparsity": None}, "sparsegpt 2:4"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_flags(parser, evaluation=False, threads=False)
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--only", nargs="*", help="runs whose name contains one of these")
    parser.add_argument("--exclude", nargs="*", default=[], help="runs whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all selected runs, interleaved")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc malloc as it is (the CLI tunes it)")
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_freed_memory()  # as the prune-cli entry point does
    bundled = load_bundled(args)
    model, cal = bundled.model, bundled.cal
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    selected = [
        run for run in RUNS
        if (not args.only or any(o in run[0] for o in args.only)) and not any(x in run[0] for x in args.exclude)
    ]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in selected}
    ratios: dict[str, list[float]] = {name: [] for name, _, base in selected if base in seconds}
    for r in range(args.repeats):
        for name, overrides, base in selected:
            model.load_state_dict(dense)
            plan = build_plan(model, resolve(None, {"sparsity": args.sparsity, **overrides}))
            start = time.perf_counter()
            calibrate_and_prune(model, plan, cal, 8, torch.device("cpu"))
            seconds[name].append(time.perf_counter() - start)
            extra = ""
            if name in ratios:  # against its base measured in the same round
                ratios[name].append(seconds[name][-1] / seconds[base][-1])
                extra = f"  {ratios[name][-1]:.3f}x its base ({base})"
            print(f"[{r + 1}/{args.repeats}] {name:28s} {seconds[name][-1]:7.1f} s{extra}", flush=True)
    print("summary: median (min-max)")
    for name, _, base in selected:
        t = seconds[name]
        line = f"{name:28s} {statistics.median(t):7.1f} s ({min(t):.1f}-{max(t):.1f})"
        if name in ratios:
            q = ratios[name]
            line += f"  {statistics.median(q):.3f}x its base ({min(q):.3f}-{max(q):.3f})"
        print(line)
    print(f"windows {args.samples}x{args.seqlen}, sparsity {args.sparsity}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"malloc {'kept (as the CLI)' if tuned else 'glibc default'}")


if __name__ == "__main__":
    main()
