"""Mergeable per-input statistics of the activations that feed a Linear.

Statistics are kept as float32 sums plus a token count, so partial results from batches,
ranks or resumed runs merge exactly by addition. Only what a method declares is collected.

For activations ``X`` of shape ``(n_tokens, in_features)``:

* ``Stat.SQ_NORM``: ``sum_sq[j] = sum_t X[t, j]^2``  -> ``||X_j||_2 = sqrt(sum_sq[j])`` (Wanda)
* ``Stat.MEAN_VAR``: ``sum[j] = sum_t X[t, j]`` plus ``sum_sq`` -> mean and variance (DSnoT)
* ``Stat.GRAM``: ``xtx = X^T X`` (in_features x in_features) -> SparseGPT Hessian ``2/n X^T X``
* ``Stat.GRAM_SAMPLE``: ``xtx`` over every ``GRAM_SAMPLE_STRIDE``-th token only (``xtx_tokens``
  says how many): a sixteenth of the cost, for a Gram matrix that only has to rank changes
  (DSnoT's guard). When a reader of the same input wants ``GRAM``, the full one serves both.

Gram matrices are computed by :func:`symmetric_gram`: only the blocks on and above the diagonal
are multiplied (about 2/3 of the work of ``X^T X`` here) and mirrored, so ``xtx`` is exactly
symmetric.

Non-finite statistics (NaN / +-inf: the activations were non-finite, or so large that their
float32 sums overflowed) raise :class:`~prune_cli.core.errors.NonFiniteError` naming the consumers,
from :meth:`InputStats.check_finite`: the layer-wise calibrator calls it once per finished
statistic, and every accessor (``norm``, ``mean``, ``var``, ``hessian``) before reading. The
accumulation itself stays free of host syncs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from prune_cli.core.errors import NonFiniteError
from prune_cli.core.finite import all_finite, describe_nonfinite, is_finite


class Stat(enum.Enum):
    SQ_NORM = "sq_norm"
    MEAN_VAR = "mean_var"
    GRAM = "gram"
    GRAM_SAMPLE = "gram_sample"


GRAM_SAMPLE_STRIDE = 16
GRAM_BLOCKS = 4


def symmetric_gram(x: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """``x^T x`` for ``x`` of shape ``(tokens, d)``, as a ``(d, d)`` matrix that is exactly
    symmetric: the columns are cut into ``blocks`` bands, band ``a`` is multiplied only with
    itself and the bands after it (``x_a^T x_{a:}``), and the lower triangle is the mirror image.
    ``(blocks + 1) / (2 blocks)`` of the multiply-adds of ``x^T x``: measured 32% less time than
    one ``x.T @ x`` at d = 1536 and 2048 tokens on 2 CPU cores (the DSnoT guard's down_proj)."""
    d = x.shape[1]
    blocks = max(1, min(blocks, d))
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(edges, edges[1:], strict=False):
        band = x[:, lo:hi].T @ x[:, lo:]  # (hi - lo, d - lo)
        square = band[:, : hi - lo]  # the diagonal block: its upper triangle, mirrored
        out[lo:hi, lo:hi] = square.triu() + square.triu(1).T
        out[lo:hi, hi:] = band[:, hi - lo :]
        out[hi:, lo:hi] = band[:, hi - lo :].T
    return out


@dataclass
class InputStats:
    """Running sums over the tokens that entered one (possibly shared) Linear input."""

    in_features: int
    wanted: frozenset[Stat]
    count: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    xtx_tokens: int = 0  # tokens summed into xtx (= count unless only GRAM_SAMPLE was wanted)
    # Names of the Linears that read this very input (q/k/v share one, gate/up another).
    consumers: list[str] = field(default_factory=list)
    # Tokens per calibration window (set by the layer-wise calibrator; 0 if unknown).
    tokens_per_window: int = 0
    # Quantities derived from these statistics and shared by their consumers (e.g. the
    # Cholesky factor of SparseGPT's inverse Hessian), keyed by the method that made them.
    derived: dict = field(default_factory=dict, repr=False)
    # Where the consumers live (e.g. ``model.layers.3``), to name them fully in messages.
    block: str = ""
    # The reorderings of these channels that the checkpoint can absorb (set by the pruning stage
    # from :class:`prune_cli.methods.permutation.Fold`'s ``groups``; None: the channel order is fixed).
    channel_groups: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # True once check_finite() found every statistic finite; update() clears it.
    _finite: bool = field(default=False, init=False, repr=False, compare=False)

    def update(self, x: torch.Tensor, backend=None) -> None:
        """Add activations ``x`` of shape ``(..., in_features)`` (any float dtype). With a
        ``backend`` (:mod:`prune_cli.gpu.backend`) the per-channel sums come from its one-pass
        kernel; the fp32 copy of ``x`` is only made for the Gram matrix."""
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} features, got {x.shape[-1]}")
        self.count += x.shape[0]
        self._finite = False
        want_sum = Stat.MEAN_VAR in self.wanted
        want_sq = Stat.SQ_NORM in self.wanted or want_sum
        if want_sq or want_sum:
            if backend is not None:
                s, sq = backend.input_stats(x, want_sum=want_sum, want_sq=want_sq)
            else:
                xf = x if x.dtype == torch.float32 else x.float()
                sq = xf.square().sum(dim=0)
                s = xf.sum(dim=0) if want_sum else None
            self.sum_sq = sq if self.sum_sq is None else self.sum_sq.add_(sq)
            if want_sum:
                self.sum = s if self.sum is None else self.sum.add_(s)
        if Stat.GRAM in self.wanted or Stat.GRAM_SAMPLE in self.wanted:
            if Stat.GRAM not in self.wanted:
                x = x[::GRAM_SAMPLE_STRIDE]
            xf = x if x.dtype == torch.float32 else x.float()
            g = symmetric_gram(xf)
            self.xtx = g if self.xtx is None else self.xtx.add_(g)
            self.xtx_tokens += x.shape[0]

    def merge(self, other: InputStats) -> InputStats:
        """Sum of two partial statistics over disjoint token sets (a new object)."""
        if other.in_features != self.in_features or other.wanted != self.wanted:
            raise ValueError("cannot merge statistics of different shape or kind")

        def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None:
                return None if b is None else b.clone()
            return a.clone() if b is None else a + b

        return InputStats(
            self.in_features,
            self.wanted,
            self.count + other.count,
            add(self.sum, other.sum),
            add(self.sum_sq, other.sum_sq),
            add(self.xtx, other.xtx),
            self.xtx_tokens + other.xtx_tokens,
            list(self.consumers),
            block=self.block,
        )

    def permuted(self, perm: torch.Tensor) -> InputStats:
        """The same statistics with the channels in the order ``perm`` (channel ``c`` of the
        result is channel ``perm[c]`` here); derived quantities are not carried over."""
        def take(t: torch.Tensor | None, both: bool = False) -> torch.Tensor | None:
            if t is None:
                return None
            p = perm.to(t.device)
            return t[p][:, p] if both else t[p]

        out = InputStats(self.in_features, self.wanted, self.count, take(self.sum), take(self.sum_sq),
                         take(self.xtx, both=True), self.xtx_tokens, list(self.consumers),
                         tokens_per_window=self.tokens_per_window, block=self.block)
        out._finite = self._finite
        return out

    def consumer_names(self) -> list[str]:
        """The consumers' names, prefixed by :attr:`block` when it is known."""
        return [f"{self.block}.{c}" if self.block else c for c in self.consumers]

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the consumers unless every collected statistic
        is finite. One host sync; a passed check is remembered until the next :meth:`update`."""
        if self._finite:
            return
        collected = {"sq_norm": self.sum_sq, "mean": self.sum, "gram": self.xtx}
        collected = {k: v for k, v in collected.items() if v is not None}
        if all_finite(collected.values()):
            self._finite = True
            return
        bad = [f"{k}: {describe_nonfinite(v)}" for k, v in collected.items() if not is_finite(v)]
        names = ", ".join(self.consumer_names()) or "a Linear"
        raise NonFiniteError(
            f"non-finite input statistics of {names} ({'; '.join(bad)})",
            hint="the activations entering these Linears are non-finite or so large that their float32 sums "
            "overflow (float16 activations overflow above 65504: rerun with --dtype float32)",
        )

    def _need(self, tensor: torch.Tensor | None, what: str) -> torch.Tensor:
        if tensor is None or self.count == 0:
            raise RuntimeError(f"statistic {what} was not collected")
        self.check_finite()
        return tensor

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel, shape ``(in_features,)``."""
        return self._need(self.sum_sq, "sq_norm").sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self._need(self.sum, "mean") / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance ``E[x^2] - E[x]^2`` per channel, clamped at 0."""
        mean = self.mean
        return (self._need(self.sum_sq, "sq_norm") / self.count - mean * mean).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """SparseGPT's ``H = 2/n X^T X``, shape ``(in_features, in_features)``."""
        if Stat.GRAM not in self.wanted:
            raise RuntimeError("the Hessian needs the full Gram matrix (Stat.GRAM), not a sample")
        return self._need(self.xtx, "gram") * (2.0 / self.xtx_tokens)
