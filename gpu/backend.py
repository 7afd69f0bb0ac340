"""Compute backends for the data-heavy steps: the :class:`Backend` protocol and its resolution.

Two implementations answer the same questions with the same answers:

* ``torch`` (:mod:`prune_cli.gpu.torch_backend`): the reference; CPU and CUDA.
* ``cupy`` (:mod:`prune_cli.gpu.cupy_backend`): CUDA C++ kernels (``gpu/kernels/*.cu``) loaded
  with ``cupy.RawModule``, fed through DLPack on torch's current stream (no copies).

Masks are bit-identical between the two (ties broken by index, as
:func:`prune_cli.methods.base.select`), and so are activation thresholds (the same float);
statistics and GEMVs agree within float tolerance.

Optional capability (not part of :class:`Backend`, looked up with ``getattr``):
``dsnot_swap(W, What, keep, regrow_metric, prune_metric, err, grow_hi, grow_lo, n_grow, *,
max_cycles, update_threshold, guarded, check_sign, prune_lists=None, m=0, base_score=None,
G=None, Gd=None, gid=None)`` runs all of DSnoT's prune-and-grow cycles for all stacked rows in
one CUDA launch, updating ``What``, ``keep``, ``err`` (and ``Gd``) in place, bit-identical to
the torch loop of :mod:`prune_cli.methods.dsnot` (see
:meth:`prune_cli.gpu.cupy_backend.CupyBackend.dsnot_swap` for shapes and the formula). Only the
CuPy backend offers it; ``DSnoT.prune_group`` calls it when the tensors are on the backend's
device and otherwise runs the torch loop (the torch backend, no backend, CPU).

Nothing here imports CuPy: :func:`resolve_backend` imports it only when the CuPy backend is
asked for (``cupy``) or may be chosen (``auto`` with a CUDA device).
"""

from __future__ import annotations

import logging
from typing import Protocol, Union, runtime_checkable

import torch

from prune_cli.core.errors import BackendUnavailableError, UnknownNameError
from prune_cli.core.names import BACKEND_NAMES
from prune_cli.core.patterns import SparsityPattern
from prune_cli.core.registry import closest
from prune_cli.gpu.availability import CupyUnavailable
from prune_cli.gpu.torch_backend import TorchBackend

log = logging.getLogger(__name__)



def gpu_extra_hint(torch_cuda: str | None = None) -> str:
    """How to install the CuPy build that matches torch's CUDA (``torch.version.cuda``)."""
    version = torch_cuda if torch_cuda is not None else (torch.version.cuda or "")
    if version.split(".")[0] == "13":
        return "install CuPy with `pip install 'prune-cli[gpu-cuda13]'` (cupy-cuda13x, for torch's CUDA 13)"
    return "install CuPy with `pip install 'prune-cli[gpu]'` (cupy-cuda12x; `[gpu-cuda13]` for a CUDA 13 torch)"


DeviceLike = Union[torch.device, str, int, None]


@runtime_checkable
class Backend(Protocol):
    """What a backend computes. Shapes: ``in`` = input features, ``out`` = output features."""

    name: str

    def input_stats(
        self, x: torch.Tensor, want_sum: bool = False, want_sq: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-input-channel sums over the tokens, in one pass.

        ``x``: ``(n, in)`` (or ``(..., in)``), fp32 / bf16 / fp16 (any float dtype).
        Returns ``(sum, sum_sq)``, each ``(in,)`` fp32 or ``None`` when not wanted:
        ``sum[j] = sum_t x[t, j]``, ``sum_sq[j] = sum_t x[t, j]^2``, accumulated in fp32.
        """
        ...

    def select_mask(self, score: torch.Tensor, pattern: SparsityPattern, scope: str = "row") -> torch.Tensor:
        """KEEP mask ``(out, in)`` bool removing the lowest ``score`` ``(out, in)`` under ``pattern``.

        Unstructured(s): per row remove ``floor(in * s)`` (scope "row") or ``floor(out * in * s)``
        over the matrix (scope "matrix"); NM(n, m): keep ``n`` of every ``m`` consecutive inputs.
        Ties by index (the lower index is removed first): equal to
        :func:`prune_cli.methods.base.select` bit for bit.
        """
        ...

    def wanda_mask(self, weight: torch.Tensor, norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
        """Wanda KEEP mask ``(out, in)`` bool for ``weight`` ``(out, in)`` and ``norm`` ``(in,)`` fp32.

        Score ``S_ij = |W_ij| * norm_j`` (fp32 multiply, as ``weight.abs().float() * norm``), selected
        per row (per M-group for N:M): equal to ``select(S, pattern, "row")`` bit for bit.
        """
        ...

    def sparse_gemv(self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Activation-sparse batch-1 GEMV: ``y = sum_{i kept} x_i * weight_t[i, :]``.

        ``x``: ``(in,)``; ``weight_t``: ``(in, out)`` = ``W^T``, input-major and contiguous;
        ``keep``: ``(in,)`` bool mask or a 1-D integer index list of kept inputs.
        Returns ``y`` ``(out,)`` in ``weight_t.dtype`` (fp32 accumulation). Only the kept rows of
        ``W^T`` are read.
        """
        ...

    def rsparse_gemv(
        self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor, u: torch.Tensor, sv: torch.Tensor
    ) -> torch.Tensor:
        """R-Sparse product: ``y = W (x * m) + U (SV (x * (1 - m)))`` with ``m`` the keep mask.

        ``x``: ``(in,)``; ``weight_t``: ``(in, out)`` = ``W^T``; ``keep`` as in :meth:`sparse_gemv`;
        ``u``: ``(out, r)``; ``sv``: ``(r, in)``. Returns ``y`` ``(out,)`` in ``weight_t.dtype``.
        """
        ...

    def activation_threshold(self, x: torch.Tensor, scale: torch.Tensor | None, k: int) -> float:
        """Exact ``k``-th smallest (1-based) activation score: the TEAL / WINA threshold.

        ``x``: ``(n, in)`` (or ``(..., in)``), fp32 / bf16 / fp16; ``scale``: ``(in,)`` fp32 or
        ``None``. Scores ``S[t, j] = |x[t, j]| * scale[j]`` (exact widening of ``|x|`` to fp32, one
        fp32 multiply, as ``x.abs() * scale``), or ``|x[t, j]|`` without a scale. Returns
        ``float(S.flatten().kthvalue(k).values)`` (NaN sorts last); ``1 <= k <= numel``, else
        ``ValueError``. The same float on every backend (NaN when the k-th score is NaN; a
        ``-0.0``, possible only with negative scales, may come back as ``+0.0``).
        """
        ...


def normalize_device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        dev = torch.device("cuda", index)
    return dev


def _load_cupy_backend(device: torch.device) -> Backend:
    """Import CuPy, check it sees ``device`` and compile the kernels (cached per device).

    Raises :class:`CupyUnavailable` with the reason. Imported lazily: only this function pulls
    in :mod:`prune_cli.gpu.cupy_backend` (and with it ``cupy``).
    """
    try:
        from prune_cli.gpu import cupy_backend  # noqa: PLC0415 (lazy on purpose)
    except ImportError as exc:
        missing = getattr(exc, "name", None) in ("cupy", None) or "cupy" in str(exc)
        reason = "CuPy is not installed" if missing else "CuPy does not import"
        raise CupyUnavailable(f"{reason} ({_one_line(exc)})", hint=gpu_extra_hint()) from None
    except Exception as exc:  # CuPy raises more than ImportError on a broken CUDA setup
        raise CupyUnavailable(
            f"CuPy does not import ({type(exc).__name__}: {_one_line(exc)})", hint=gpu_extra_hint()
        ) from None
    return cupy_backend.get_cupy_backend(device)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_backend() -> Backend:

    return TorchBackend()


def resolve_backend(name: str | None, device: DeviceLike) -> tuple[Backend, str | None]:
    """The backend to use for ``name`` (auto | torch | cupy) with the model on ``device``.

    Returns ``(backend, message)``; ``message`` is one info line saying what ``auto`` chose and
    why (``None`` for an explicit choice). ``auto`` picks CuPy only when the device is CUDA,
    ``cupy`` imports and the kernels compile; otherwise torch. An explicit ``cupy`` that cannot
    run raises :class:`~prune_cli.core.errors.BackendUnavailableError` (exit code 2), never a silent
    fallback.
    """
    key = (name or "auto").strip().lower()
    if key not in BACKEND_NAMES:
        close = closest(key, BACKEND_NAMES)
        raise UnknownNameError(
            f"unknown backend {name!r}",
            hint=f"did you mean {close!r}?" if close else f"backends: {', '.join(BACKEND_NAMES)}",
        )
    dev = normalize_device(device)
    if key == "torch":
        return _torch_backend(), None

    if dev.type != "cuda":
        if key == "cupy":
            raise BackendUnavailableError(
                f"backend cupy needs a CUDA device, but the model runs on {dev.type}",
                hint="run with --device cuda on a machine with an NVIDIA GPU, or use --backend auto or torch",
            )
        return _torch_backend(), f"backend auto: torch (the model runs on {dev.type}; the CuPy kernels need CUDA)"

    try:
        backend = _load_cupy_backend(dev)
    except CupyUnavailable as exc:
        if key == "cupy":
            raise BackendUnavailableError(f"backend cupy cannot run: {exc.reason}", hint=exc.hint) from None
        return _torch_backend(), f"backend auto: torch ({exc.reason})"
    if key == "cupy":
        return backend, None
    return backend, f"backend auto: cupy (CUDA kernels on {dev})"
