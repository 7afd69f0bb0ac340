"""Held-out perplexity of activation sparsity on the bundled model, with the achieved sparsity
measured on the held-out tokens (every token sparsified), in one process.

    python bench/activation_quality.py [--levels 0.25 0.4 0.5] [--only NAME ...] [--exact] [--out docs/activation_quality.json]

Calibration: 32 x 512 tokens of the bundled calibration text (seed 0); evaluation: 16 x 512
tokens of the disjoint evaluation text; fp32, CPU. "achieved" is the parameter-weighted
skipped fraction of the dense products' work on the held-out tokens (R-Sparse's low-rank
remainder counted as work); "input" is the skipped fraction of input channels.
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

from prune_cli.activation import build_activation_method  # noqa: E402
from prune_cli.activation.modules import count_sparsity, unwrap_all  # noqa: E402
from prune_cli.activation.transform import apply_transform, rotations_for, strip_transform  # noqa: E402
from prune_cli.stages.activation import activation_targets, allocate, calibrate_activation  # noqa: E402
from prune_cli.stages.evaluate import perplexity  # noqa: E402

RUNS = [
    ("teal (uniform)", "teal", {}, "uniform"),
    ("teal (greedy, Fisher-weighted)", "teal", {}, "greedy"),
    ("wina, every Linear (uniform)", "wina", {}, "uniform"),
    ("wina, as released (top-k, k/gate norms)", "wina", {"selection": "topk", "variant": "released"}, "uniform"),
    ("wina, every Linear (greedy, Fisher-weighted)", "wina", {}, "greedy"),
    ("rsparse (auto alpha, activation-aware SVD)", "rsparse", {}, "uniform"),
    ("rsparse (auto alpha, plain SVD)", "rsparse", {"svd": "weight"}, "uniform"),
    ("rsparse (auto alpha, activation-aware SVD, greedy, Fisher-weighted)", "rsparse", {}, "greedy"),
    ("wina + transform (uniform)", "wina", {"transform": True}, "uniform"),
    ("wina + transform (greedy, Fisher-weighted)", "wina", {"transform": True}, "greedy"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="*", default=[0.25, 0.4, 0.5])
    add_window_flags(parser)
    add_run_filter(parser)
    parser.add_argument("--out", default="docs/activation_quality.json")
    args = parser.parse_args()

    bundled = load_bundled(args)
    model, cal, ev = bundled.model, bundled.cal, bundled.ev
    device = torch.device("cpu")
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {"dense": perplexity(model, ev).ppl, "runs": [], "setup": vars(args)}
    print(f"dense ppl {results['dense']:.3f}", flush=True)
    targets = activation_targets(model, lambda name: True)
    for label, name, options, allocation in RUNS:
        if not wanted(label, args):
            continue
        method = build_activation_method(name, options)
        for level in args.levels:
            start = time.perf_counter()
            if method.options().get("transform"):
                apply_transform(model, rotations_for(model))
            sparsity, _ = allocate(model, targets, method, allocation, level, cal, 8, device, 16384, 0)
            calibrate_activation(model, targets, method, sparsity, cal, 8, device, 16384, 0)
            seconds = time.perf_counter() - start
            with count_sparsity(model) as counted:
                ppl = perplexity(model, ev).ppl
            row = {"method": label, "target": level, "ppl": ppl, "achieved": counted.overall("compute"),
                   "input_sparsity": counted.overall("input"), "seconds": round(seconds, 1)}
            results["runs"].append(row)
            print(f"{label:45s} {level:.2f} ppl {ppl:8.3f} achieved {row['achieved']:.4f} "
                  f"(input {row['input_sparsity']:.4f}) {seconds:.0f} s", flush=True)
            unwrap_all(model)
            strip_transform(model)
            model.load_state_dict(dense_state)  # every run starts from the same dense weights
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("tables: python bench/make_tables.py > docs/quality.md")


if __name__ == "__main__":
    main()
