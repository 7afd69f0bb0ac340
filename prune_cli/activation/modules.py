"""The input sparsifier: a real module that wraps a Linear (no patched ``forward``).

For input ``x`` (``(..., in)``) and per-channel scale ``c`` (``(in,)``):

* mask ``m = 1[|x_i| * c_i > tau]`` per token (TEAL: ``c = 1``; WINA: ``c_i = ||W_:,i||_2``),
* ``y = W (x * m) + b``, and with a low-rank remainder (R-Sparse)
  ``y = W (x * m) + U (V (x * (1 - m))) + b`` with ``U`` ``(out, r)`` and ``V`` ``(r, in)``.

Batch-1 decode (one token) takes a gather path that reads only the kept channels' weights:
``y = sum_{i kept} x_i W^T[i, :]`` via ``embedding_bag`` over an input-major copy ``W^T``
(``(in, out)`` contiguous), made once by :meth:`SparseInputLinear.prepare_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SparseInputLinear(nn.Module):
    """``Linear`` whose small input activations are zeroed (see module docstring)."""

    def __init__(
        self,
        linear: nn.Linear,
        threshold: float,
        channel_scale: torch.Tensor | None = None,
        lowrank_u: torch.Tensor | None = None,
        lowrank_v: torch.Tensor | None = None,
        keep_count: int = 0,
    ):
        super().__init__()
        self.linear = linear
        device = linear.weight.device
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32, device=device))
        # > 0: per-token top-k selection (keep the keep_count largest scores of every token)
        self.register_buffer("keep_count", torch.tensor(int(keep_count), dtype=torch.long, device=device))
        scale = torch.ones(linear.in_features) if channel_scale is None else channel_scale
        self.register_buffer("channel_scale", scale.detach().float().to(device).contiguous())
        self.register_buffer("lowrank_u", None if lowrank_u is None else lowrank_u.detach().to(device, linear.weight.dtype))
        self.register_buffer("lowrank_v", None if lowrank_v is None else lowrank_v.detach().to(device, linear.weight.dtype))
        self.weight_t: torch.Tensor | None = None  # input-major copy for the decode path
        self._bag_offsets: torch.Tensor | None = None
        self._channel_threshold: torch.Tensor | None = None  # decode with thresholds: tau / c_i
        self.counting = False
        self.kept = 0
        self.seen = 0

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_u is None else int(self.lowrank_u.shape[1])

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """KEEP mask of the input channels, same shape as ``x``."""
        scores = x.abs().float() * self.channel_scale
        k = int(self.keep_count)
        if k > 0:
            keep = torch.zeros_like(scores, dtype=torch.bool)
            return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
        return scores > self.threshold

    def prepare_decode(self) -> None:
        """Make what the one-token path reads: the input-major weight copy ``W^T`` (``(in,
        out)``), the per-channel thresholds ``tau / c_i`` (``|x_i| c_i > tau`` iff
        ``|x_i| > tau / c_i`` for ``c_i > 0``; a channel with ``c_i = 0`` is never kept unless
        ``tau < 0``) and the one-bag offsets."""
        self.weight_t = self.linear.weight.detach().t().contiguous()
        c, tau = self.channel_scale, self.threshold
        never = torch.where(tau < 0, float("-inf"), float("inf"))
        thresholds = torch.where(c > 0, tau / c.clamp_min(torch.finfo(c.dtype).tiny), never)
        self._channel_threshold = thresholds.to(self.linear.weight.dtype) if int(self.keep_count) == 0 else None
        self._bag_offsets = torch.zeros(1, dtype=torch.long, device=c.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_token = self.weight_t is not None and x.shape[:-1].numel() == 1 and self.lowrank_u is None
        if one_token and self._channel_threshold is not None:
            keep = x.abs() > self._channel_threshold  # the same mask, 2 small ops instead of 3
        else:
            keep = self.mask(x)
        if self.counting:
            self.kept += int(keep.sum())
            self.seen += keep.numel()
        if one_token:
            return self._decode_one(x, keep)
        y = F.linear(x * keep, self.linear.weight, self.linear.bias)
        if self.lowrank_u is not None:
            rest = x * ~keep
            y = y + F.linear(F.linear(rest, self.lowrank_v), self.lowrank_u)
        return y

    def _decode_one(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        idx = keep.reshape(-1).nonzero().squeeze(1)
        y = F.embedding_bag(idx, self.weight_t, self._bag_offsets, per_sample_weights=flat[idx], mode="sum")
        if self.linear.bias is not None:
            y = y + self.linear.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def wrap(parent: nn.Module, child_name: str, module: SparseInputLinear) -> None:
    setattr(parent, child_name, module)


def sparsifiers(model: nn.Module) -> dict[str, SparseInputLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseInputLinear)}


def unwrap_all(model: nn.Module) -> dict[str, SparseInputLinear]:
    """Put the original Linears back (e.g. before ``save_pretrained``); returns the wrappers."""
    found = sparsifiers(model)
    for name, module in found.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.linear)
    return found


def rewrap_all(model: nn.Module, wrappers: dict[str, SparseInputLinear]) -> None:
    for name, module in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class _Count:
    """What one wrapped Linear saw while counting: kept and seen input entries, and its shape."""

    kept: int
    seen: int
    in_features: int
    out_features: int
    rank: int

    @property
    def compute_sparsity(self) -> float:
        """Skipped fraction of the dense product's work: ``1 - kept/seen - r (in + out) / (in out)``
        (the low-rank remainder of R-Sparse costs ``r (in + out)`` per token)."""
        lowrank = self.rank * (self.in_features + self.out_features) / (self.in_features * self.out_features)
        return 1 - self.kept / self.seen - lowrank


class SparsityTally:
    """Achieved activation sparsity per wrapped Linear (by full name), mergeable across blocks
    that are counted one at a time (:class:`count_sparsity` with ``into``)."""

    def __init__(self) -> None:
        self.counts: dict[str, _Count] = {}

    def per_layer(self) -> dict[str, dict]:
        return {
            n: {"input_sparsity": 1 - c.kept / c.seen, "compute_sparsity": c.compute_sparsity}
            for n, c in self.counts.items() if c.seen
        }

    def overall(self, kind: str = "compute") -> float:
        """Parameter-weighted mean over the wrapped Linears of the skipped input fraction
        (``kind="input"``) or of the skipped work including any low-rank cost (``"compute"``)."""
        num = den = 0.0
        for c in self.counts.values():
            if c.seen:
                w = c.in_features * c.out_features
                num += w * (c.compute_sparsity if kind == "compute" else 1 - c.kept / c.seen)
                den += w
        return num / den if den else 0.0


class count_sparsity(SparsityTally):
    """Context manager measuring the achieved input sparsity of every wrapper in ``model``;
    the counts (names prefixed with ``prefix.``) are there after exit, and also added to
    ``into`` when given."""

    def __init__(self, model: nn.Module, prefix: str = "", into: SparsityTally | None = None):
        super().__init__()
        self.modules = sparsifiers(model)
        self.prefix = f"{prefix}." if prefix else ""
        self.into = into

    def __enter__(self):
        for m in self.modules.values():
            m.counting, m.kept, m.seen = True, 0, 0
        return self

    def __exit__(self, *exc):
        for name, m in self.modules.items():
            m.counting = False
            self.counts[self.prefix + name] = _Count(m.kept, m.seen, m.in_features, m.out_features, m.rank)
        if self.into is not None:
            self.into.counts.update(self.counts)
