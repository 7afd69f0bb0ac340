"""Held-out perplexity of the weight methods on the bundled model, measured in one process.

    python bench/quality.py [--samples 32] [--seqlen 512] [--eval-windows 16] [--only NAME ...]
        [--exact] [--levels 50% 60% 70% 2:4] [--out docs/quality.json]

Calibration: 32 x 512 tokens from the calibration part of the bundled CPython pydoc topics
(seed 0); evaluation: 16 x 512 tokens from the disjoint evaluation part; fp32 on the CPU.
Every run starts from the same dense weights. Prints each result and writes JSON (tables: bench/make_tables.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from bundled_setup import add_run_filter, add_window_flags, load_bundled, wanted  # noqa: E402

from prune_cli.calibrators.sampling import validation_windows  # noqa: E402
from prune_cli.recipe.config import resolve  # noqa: E402
from prune_cli.recipe.plan import build_plan  # noqa: E402
from prune_cli.stages.allocation import allocate_owl  # noqa: E402
from prune_cli.stages.evaluate import perplexity  # noqa: E402
from prune_cli.stages.pruning import calibrate_and_prune  # noqa: E402

LEVELS = [("50%", {"sparsity": 0.5}), ("60%", {"sparsity": 0.6}), ("70%", {"sparsity": 0.7}), ("2:4", {"pattern": "2:4"})]
REF_RELEASED = {"mode": "reference", "skip": r"^mlp\."}


def runs() -> list[tuple[str, str, dict]]:
    """Most informative first (a partial run is still useful)."""
    out = []
    for level, pat in LEVELS:
        out += [
            ("wanda", level, {"method": "wanda", **pat}),
            ("sparsegpt", level, {"method": "sparsegpt", **pat}),
            ("ria", level, {"method": "ria", **pat}),
            ("alps", level, {"method": "alps", **pat}),
            ("dsnot-reference(wanda, as released: attention only)", level, {"method": "dsnot", "method_options": {"base": "wanda", **REF_RELEASED}, **pat}),
            ("dsnot-guarded(wanda)", level, {"method": "dsnot", "method_options": {"base": "wanda"}, **pat}),
        ]
    out.append(("ria (no permutation)", "2:4", {"method": "ria", "pattern": "2:4", "method_options": {"permute": False}}))
    for level, s in (("60%", 0.6), ("70%", 0.7)):
        out += [
            ("owl(wanda, M=5, lambda=0.08)", level, {"method": "wanda", "sparsity": s, "layerwise": {"method": "owl", "m": 5, "lambda": 0.08}}),
            ("owl(wanda, auto)", level, {"method": "wanda", "sparsity": s, "layerwise": {"method": "owl"}}),
        ]
    for level, pat in LEVELS:
        out += [
            ("dsnot-reference(sparsegpt, all layers)", level, {"method": "dsnot", "method_options": {"base": "sparsegpt", "mode": "reference"}, **pat}),
            ("dsnot-guarded(sparsegpt)", level, {"method": "dsnot", "method_options": {"base": "sparsegpt"}, **pat}),
            ("dsnot-reference(wanda, all layers)", level, {"method": "dsnot", "method_options": {"base": "wanda", "mode": "reference"}, **pat}),
            ("dsnot-guarded(wanda, full Gram)", level, {"method": "dsnot", "method_options": {"base": "wanda", "guard_gram": "full"}, **pat}),
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_window_flags(parser)
    add_run_filter(parser)
    parser.add_argument("--levels", nargs="*", help="levels to keep (50%% 60%% 70%% 2:4)")
    parser.add_argument("--out", default="docs/quality.json")
    args = parser.parse_args()

    bundled = load_bundled(args)
    model, cal, ev = bundled.model, bundled.cal, bundled.ev
    val = validation_windows(bundled.cal_ids, args.samples, 4, args.seqlen, seed=0)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    device = torch.device("cpu")
    results = {"dense": perplexity(model, ev).ppl, "runs": [], "setup": vars(args)}
    print(f"dense ppl {results['dense']:.3f}", flush=True)
    for name, level, overrides in runs():
        if not wanted(name, args):
            continue
        if args.levels and level not in args.levels:
            continue
        model.load_state_dict(dense_state)
        config = resolve(None, overrides)
        plan = build_plan(model, config)
        start = time.perf_counter()
        allocation = None
        if config.owl is not None:
            plan, allocation = allocate_owl(model, plan, config.owl, cal, val, 8, device, config.pattern.target_sparsity)
        calibrate_and_prune(model, plan, cal, 8, device)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, ev).ppl
        row = {"method": name, "level": level, "ppl": ppl, "seconds": round(seconds, 1)}
        if allocation is not None:
            row["owl"] = {"m": allocation.m, "lambda": allocation.lam}
        results["runs"].append(row)
        print(f"{name:55s} {level:4s} ppl {ppl:10.3f}  ({seconds:.0f} s){'  ' + str(row.get('owl')) if allocation else ''}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("tables: python bench/make_tables.py > docs/quality.md")


if __name__ == "__main__":
    main()
