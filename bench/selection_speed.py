"""Mask selection: the threshold ``select`` against the full stable sort it replaced, same run.

    python bench/selection_speed.py [--repeats 20] [--sparsity 0.6]

For the Linear shapes of the bundled SmolLM2-135M (q/o 576x576, k/v 192x576, gate/up 1536x576,
down 576x1536) and random float32 scores, times ``prune_cli.core.selection.select`` and the old
sort-based selection (kept here verbatim) per scope ("row": Wanda/RIA; "matrix": ALPS, which
selects at every ADMM iteration; "2:4": every N:M method, ALPS at every iteration), checks the
masks are equal, and prints each time and the ratio new / old (below 1: faster). Median of
``--repeats`` calls each, one process. "matrix" above 262144 scores takes the bracketed k-th value
(``kth_smallest``), "2:4" the pairwise group ranks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (192, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536)}


def sort_select(score: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """The selection before the threshold one: a full stable ascending sort (ties by index)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if scope == "2:4":
        order = torch.sort(score.reshape(score.shape[0], -1, 4), dim=2, stable=True).indices[:, :, :2]
        keep.view(score.shape[0], -1, 4).scatter_(2, order, False)
    elif scope == "row":
        k = int(score.shape[1] * sparsity)
        keep.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], False)
    else:
        k = int(score.numel() * sparsity)
        keep.view(-1)[torch.sort(score.reshape(-1), stable=True).indices[:k]] = False
    return keep


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.6)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    pattern = Unstructured(args.sparsity)
    print(f"{'layer':14s} {'scope':6s} {'sort ms':>8s} {'threshold ms':>13s} {'new/old':>8s}")
    ratios = []
    for name, shape in SHAPES.items():
        score = torch.rand(shape, generator=generator)
        for scope in ("row", "matrix", "2:4"):
            chosen, how = (NM(2, 4), "row") if scope == "2:4" else (pattern, scope)
            assert torch.equal(select(score, chosen, how), sort_select(score, args.sparsity, scope))
            old = median_seconds(lambda: sort_select(score, args.sparsity, scope), args.repeats)
            new = median_seconds(lambda: select(score, chosen, how), args.repeats)
            ratios.append(new / old)
            print(f"{name:14s} {scope:6s} {old * 1e3:8.2f} {new * 1e3:13.2f} {new / old:8.3f}")
    print(f"median ratio new/old {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"threads {torch.get_num_threads()}, sparsity {args.sparsity}, {args.repeats} calls each")


if __name__ == "__main__":
    main()
