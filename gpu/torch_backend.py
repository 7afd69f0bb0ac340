"""The torch backend: the reference every kernel is checked against (CPU and CUDA).

It has no ``dsnot_swap``: with this backend DSnoT runs its own torch swap loop
(:mod:`prune_cli.methods.dsnot`), which is the reference for the CuPy kernel."""

from __future__ import annotations

import torch

from prune_cli.core.patterns import SparsityPattern
from prune_cli.core.selection import kth_smallest, select


def kept_indices(keep: torch.Tensor, in_features: int) -> torch.Tensor:
    """``keep`` (a ``(in,)`` bool/uint8 mask or a 1-D integer index list) as an int64 index list."""
    if keep.dim() != 1:
        raise ValueError(f"keep must be 1-D, got shape {tuple(keep.shape)}")
    if keep.dtype in (torch.bool, torch.uint8):
        if keep.shape[0] != in_features:
            raise ValueError(f"keep mask has {keep.shape[0]} entries for {in_features} inputs")
        return keep.nonzero().squeeze(1)
    if keep.dtype.is_floating_point or keep.dtype.is_complex:
        raise ValueError(f"keep must be a bool mask or an integer index list, got {keep.dtype}")
    return keep.long()


def keep_mask(keep: torch.Tensor, in_features: int) -> torch.Tensor:
    """``keep`` as a ``(in,)`` bool mask."""
    if keep.dtype in (torch.bool, torch.uint8):
        if keep.dim() != 1 or keep.shape[0] != in_features:
            raise ValueError(f"keep mask must have shape ({in_features},), got {tuple(keep.shape)}")
        return keep.bool()
    mask = torch.zeros(in_features, dtype=torch.bool, device=keep.device)
    return mask.index_fill_(0, kept_indices(keep, in_features), True)  # no host sync, graph-capturable


def check_gemv_shapes(x: torch.Tensor, weight_t: torch.Tensor, u: torch.Tensor | None = None,
                      sv: torch.Tensor | None = None) -> None:
    if weight_t.dim() != 2:
        raise ValueError(f"weight_t must be (in, out), got shape {tuple(weight_t.shape)}")
    in_features, out_features = weight_t.shape
    if x.shape != (in_features,):
        raise ValueError(f"x must have shape ({in_features},), got {tuple(x.shape)}")
    if u is not None or sv is not None:
        if u is None or sv is None or u.dim() != 2 or sv.dim() != 2:
            raise ValueError("u (out, r) and sv (r, in) must both be given as matrices")
        if u.shape[0] != out_features or sv.shape[1] != in_features or u.shape[1] != sv.shape[0]:
            raise ValueError(
                f"low-rank factors do not fit: u {tuple(u.shape)}, sv {tuple(sv.shape)} for W^T {tuple(weight_t.shape)}"
            )


class TorchBackend:
    """Plain torch: the reference semantics of :class:`prune_cli.gpu.backend.Backend`."""

    name = "torch"

    def input_stats(
        self, x: torch.Tensor, want_sum: bool = False, want_sq: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``x`` ``(n, in)`` (or ``(..., in)``), any float dtype -> ``(sum, sum_sq)``, ``(in,)`` fp32 each.

        ``sum[j] = sum_t x[t, j]``, ``sum_sq[j] = sum_t x[t, j]^2`` (``None`` when not wanted);
        the same arithmetic as :meth:`prune_cli.calibrators.stats.InputStats.update`.
        """
        x2 = x.reshape(-1, x.shape[-1])
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        total = xf.sum(dim=0) if want_sum else None
        squares = xf.square().sum(dim=0) if want_sq else None
        return total, squares

    def select_mask(self, score: torch.Tensor, pattern: SparsityPattern, scope: str = "row") -> torch.Tensor:
        """``score`` ``(out, in)`` -> KEEP mask ``(out, in)`` bool: exactly
        :func:`prune_cli.methods.base.select` (stable ascending sort: ties by index)."""

        return select(score, pattern, scope)

    def wanda_mask(self, weight: torch.Tensor, norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
        """``weight`` ``(out, in)``, ``norm`` ``(in,)`` -> KEEP mask of ``S = |W| * norm`` (fp32), per row."""
        score = weight.abs().float() * norm.to(weight.device).unsqueeze(0)
        return self.select_mask(score, pattern, "row")

    def sparse_gemv(self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``y (out,) = sum_{i kept} x_i * weight_t[i, :]`` with ``weight_t`` ``(in, out)``.

        Gathers the kept rows of ``W^T`` and runs one GEMV (native dtype when ``x`` matches the
        weight; otherwise in fp32). Returns ``weight_t.dtype``.
        """
        check_gemv_shapes(x, weight_t)
        idx = kept_indices(keep, weight_t.shape[0])
        return self._gemv(x.index_select(0, idx), weight_t.index_select(0, idx), weight_t.dtype)

    def rsparse_gemv(
        self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor, u: torch.Tensor, sv: torch.Tensor
    ) -> torch.Tensor:
        """``y (out,) = W (x * m) + U (SV (x * (1 - m)))``; ``weight_t`` ``(in, out)``, ``u`` ``(out, r)``,
        ``sv`` ``(r, in)``, ``m`` the keep mask. Returns ``weight_t.dtype``."""
        check_gemv_shapes(x, weight_t, u, sv)
        idx = kept_indices(keep, weight_t.shape[0])  # no host sync when keep is an index list
        dropped = torch.where(keep_mask(keep, weight_t.shape[0]), torch.zeros_like(x), x)
        xs, ws = x.index_select(0, idx), weight_t.index_select(0, idx)
        if x.dtype == weight_t.dtype == u.dtype == sv.dtype:
            return xs @ ws + u @ (sv @ dropped)
        y = xs.float() @ ws.float() + u.float() @ (sv.float() @ dropped.float())
        return y.to(weight_t.dtype)

    def activation_threshold(self, x: torch.Tensor, scale: torch.Tensor | None, k: int) -> float:
        """The ``k``-th smallest (1-based) activation score over all entries, as a float.

        ``x``: ``(n, in)`` (or ``(..., in)``), any float dtype; ``scale``: ``(in,)`` or ``None``.
        Scores ``S[t, j] = |x[t, j]| * scale[j]`` (``|x[t, j]|`` without a scale; torch's type
        promotion, so fp32 for a bf16/fp16 ``x`` and an fp32 ``scale``); returns
        ``float(S.flatten().kthvalue(k).values)`` (NaN sorts last). ``1 <= k <= numel``, else
        ``ValueError``. The threshold of :func:`prune_cli.activation.base.quantile_threshold`.
        """
        numel = x.numel()
        if not 1 <= k <= numel:
            raise ValueError(f"activation_threshold: k = {k} is outside [1, {numel}]")
        scores = x.abs() if scale is None else x.abs() * scale.to(x.device)
        return float(kth_smallest(scores.reshape(-1), k))  # = kthvalue's, in fewer passes

    @staticmethod
    def _gemv(xs: torch.Tensor, ws: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if xs.dtype == ws.dtype:
            return xs @ ws
        return (xs.float() @ ws.float()).to(dtype)
