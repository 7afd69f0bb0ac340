"""DSnoT swap-loop inputs shared by the CPU model tests, the host-emulated tests and the GPU
parity tests of ``gpu/kernels/dsnot.cu``.

A "block": two Linears reading the same input (one shared Gram matrix ``G``, like q/k), one
with its own input, at a width that is not a multiple of any block size; weights on a coarse
grid so that regrow rankings, Wanda scores and base scores are full of ties. With a low
sparsity every row has only a few regrow candidates, so rows exhaust their lists.
"""

from __future__ import annotations

import numpy as np
import torch

from prune_cli.calibrators.stats import InputStats, Stat
from prune_cli.core.patterns import NM, Unstructured
from prune_cli.gpu.torch_backend import TorchBackend
from prune_cli.methods import build_method
from prune_cli.methods.dsnot import _Part, _Rows, _SwapState
from tests.gpu import kernel_model as km

ALL_STATS = frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM})

# (pattern, width): widths not multiples of 32 / 128; N:M widths whole groups
CASES = {
    "unstructured": (Unstructured(0.6), 37),
    "unstructured-exhausting": (Unstructured(0.1), 37),  # 3 regrow candidates per row
    "2:4": (NM(2, 4), 44),
    "3:4-exhausting": (NM(3, 4), 20),  # 5 regrow candidates per row
    "4:8": (NM(4, 8), 40),
}
MODES = ("guarded", "reference")


def inputs(n_tokens: int, width: int, seed: int, device="cpu") -> torch.Tensor:
    """Correlated channels with non-zero means, on a coarse grid (ties in the statistics)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    x = torch.randn(n_tokens, width, generator=g) @ mix + torch.randn(width, generator=g)
    return (torch.round(x * 4) / 4).to(device)


def stats_of(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], ALL_STATS, tokens_per_window=8)
    s.update(x)
    return s


def weights(out_f: int, width: int, seed: int, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-6, 7, (out_f, width), generator=g).float() * 0.125).to(device)


def jobs(pattern, width: int, seed: int = 0, device="cpu"):
    shared = stats_of(inputs(300, width, seed, device))
    own = stats_of(inputs(200, width, seed + 1, device))
    return [
        (weights(23, width, seed + 2, device), shared, pattern),
        (weights(9, width, seed + 3, device), own, pattern),
        (weights(14, width, seed + 4, device), shared, pattern),  # the same G as the first
    ]


def method(mode: str, threshold: float = 0.1, max_cycles: int = 50, sign_check: str = "auto"):
    return build_method("dsnot", {"mode": mode, "update_threshold": threshold, "max_cycles": max_cycles,
                                  "sign_check": sign_check})


def swap_state(dsnot, job_list):
    """What ``DSnoT.prune_group`` hands the swap loop: ``(rows, state, lists, m)``."""
    pattern = job_list[0][2]
    m = pattern.m if isinstance(pattern, NM) else 0
    base = dsnot.base_method()
    results = [base.prune(w, s, p) for w, s, p in job_list]
    rows = _Rows.stack([_Part(job, res, base, m) for job, res in zip(job_list, results)], dsnot.mode == "guarded")
    state = _SwapState(dsnot, rows, dsnot._sign_check(pattern))
    lists = None if m else dsnot._prune_lists(state, rows)
    return rows, state, lists, m


def run_torch_loop(dsnot, rows, state, lists, m) -> None:
    if m:
        dsnot._swap_nm(state, rows, m)
    else:
        dsnot._swap_unstructured(state, lists)


def outputs(rows, state) -> dict[str, torch.Tensor]:
    out = {"What": rows.What, "keep": rows.keep, "err": state.err}
    if rows.Gd is not None:
        out["Gd"] = rows.Gd
    return {k: v.detach().cpu().clone() for k, v in out.items()}


def assert_bit_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, b in want.items():
        a = got[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype.is_floating_point:  # bit patterns: -0 vs +0 and NaN payloads count
            same = a.view(torch.int32) == b.view(torch.int32)
        else:
            same = a == b
        assert bool(same.all()), f"{name}: {int((~same).sum())} of {a.numel()} entries differ"


class ModelBackend(TorchBackend):
    """The torch backend plus ``dsnot_swap`` run by the NumPy model of dsnot.cu (CPU tensors):
    what the CuPy backend offers, with the kernel replaced by its line-by-line model."""

    name = "model"
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0
        self.cycles = self.exhausted = None  # per row, from the last call

    def dsnot_swap(self, W, What, keep, regrow_metric, prune_metric, err, grow_hi, grow_lo, n_grow, *, max_cycles,
                   update_threshold, guarded, check_sign, prune_lists=None, m=0, base_score=None, G=None, Gd=None,
                   gid=None):
        self.calls += 1
        keep8 = keep.view(torch.uint8)
        kw = {}
        if guarded:
            kw = {"G": G.numpy(), "Gd": Gd.numpy(), "gid": gid.numpy()}
        if m:
            kw.update(m=m, score=base_score.numpy(), used=np.zeros(tuple(W.shape), dtype=np.uint8))
        else:
            prune_pos, n_pos, prune_neg, n_neg = prune_lists
            kw.update(prune_pos=prune_pos.numpy(), n_pos=n_pos.numpy(), prune_neg=prune_neg.numpy(), n_neg=n_neg.numpy())
        with np.errstate(all="ignore"):
            self.cycles, self.exhausted = km.dsnot_swap(
                W.numpy(), What.numpy(), keep8.numpy(), regrow_metric.numpy(), prune_metric.numpy(),
                          err.numpy(), grow_hi.numpy(), grow_lo.numpy(), n_grow.numpy(), max_cycles=max_cycles,
                          threshold=np.float32(update_threshold), guarded=guarded, check_sign=check_sign, **kw)
