"""The CuPy backend: the CUDA C++ kernels of ``gpu/kernels/`` behind :class:`Backend`.

Importing this module imports CuPy; :func:`prune_cli.gpu.backend.resolve_backend` does so only
when this backend is asked for or may be chosen. Tensors stay torch tensors: each call views
them as CuPy arrays through DLPack (no copy; bf16/fp16 as raw 16-bit words, bool as uint8) and
launches on torch's current stream (``cupy.cuda.Stream.from_external``, or
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)`` on older CuPy), so the
kernels are ordered with torch's own work without any extra synchronisation. Every buffer (outputs and
scratch) is allocated by torch's caching allocator.

Kernel-by-kernel descriptions live at the top of each ``.cu`` file. A few inputs go to the
torch reference instead of a kernel (same results by construction): ``scope="matrix"``,
float64 scores, non-fp32 Wanda norms, N:M with M > 256, low-rank factors whose dtype differs
from the weight's, ranks above 1024, float64 activations or non-fp32 scales for the activation
threshold.
"""

from __future__ import annotations

import math
import operator
import threading
import warnings

import cupy as cp
import numpy as np
import torch

from prune_cli.core.patterns import NM, SparsityPattern, Unstructured
from prune_cli.gpu import launch
from prune_cli.gpu.availability import CupyUnavailable
from prune_cli.gpu.kernel_source import KERNELS, module_source
from prune_cli.gpu.torch_backend import TorchBackend, check_gemv_shapes, keep_mask

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2}

_DSNOT_THREADS = 128  # PC_DSNOT_THREADS in dsnot.cu: one warp per row
_DSNOT_ROWS_PER_BLOCK = _DSNOT_THREADS // 32

_lock = threading.Lock()
_instances: dict[int, CupyBackend] = {}


def get_cupy_backend(device: torch.device) -> CupyBackend:
    """The backend for ``device`` (compiled once per process and device).

    Raises :class:`CupyUnavailable` when CuPy cannot use the device or the kernels do not build.
    """
    index = device.index if device.index is not None else 0
    with _lock:
        if index not in _instances:
            _instances[index] = CupyBackend(index)
        return _instances[index]


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _i64(v: int) -> np.int64:
    return np.int64(v)


class CupyBackend:
    """CuPy RawModule kernels; see :class:`prune_cli.gpu.backend.Backend` for the semantics."""

    name = "cupy"

    def __init__(self, index: int):
        self.index = index
        self.device = torch.device("cuda", index)
        self._reference = TorchBackend()
        self._streams: dict[int, object] = {}
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # driver missing / too old
            raise CupyUnavailable(
                f"CuPy cannot use the GPU ({type(exc).__name__}: {_first_line(exc)})",
                hint="check the NVIDIA driver and that the CuPy wheel matches its CUDA version (cupy-cuda12x)",
            ) from None
        if index >= count:
            raise CupyUnavailable(
                f"CuPy sees {count} CUDA device(s), not cuda:{index}",
                hint="check CUDA_VISIBLE_DEVICES; torch and CuPy must see the same devices",
            )
        try:
            with cp.cuda.Device(index):
                rt = cp.cuda.runtime
                self.sm_count = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMultiProcessorCount", 16), index)
                self.smem_optin = rt.deviceGetAttribute(getattr(rt, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97), index)
                self.fn = {}
                for module_name, names in KERNELS.items():
                    module = cp.RawModule(code=module_source(module_name))
                    module.compile()  # now, so that a compile error is reported here, not mid-run
                    for kernel_name in names:
                        self.fn[kernel_name] = module.get_function(kernel_name)
                # Row selection keeps a whole row of keys in dynamic shared memory when it fits.
                self.select_smem = {}
                for kernel_name in [n for n in self.fn if n.startswith("select_rows_")]:
                    kernel = self.fn[kernel_name]
                    dynamic = max(0, self.smem_optin - kernel.shared_size_bytes - 1024)
                    kernel.max_dynamic_shared_size_bytes = dynamic
                    self.select_smem[kernel_name] = dynamic
        except CupyUnavailable:
            raise
        except Exception as exc:
            if type(exc).__name__ == "CompileException":
                reason = "the CUDA kernels did not compile"
                hint = "this is a bug in prune-cli's gpu/kernels (please report it); use --backend torch meanwhile"
            else:
                reason = "the CUDA kernels did not load"
                hint = (
                    "CuPy needs NVRTC (pip install nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvrtc for CUDA 13, or a CUDA "
                    "toolkit) and a driver as new "
                    "as its CUDA; use --backend torch to run without the kernels"
                )
            raise CupyUnavailable(f"{reason}: {type(exc).__name__}: {_first_line(exc)}", hint=hint) from None

    # ---------------------------------------------------------------- plumbing
    def _stream(self):
        ptr = torch.cuda.current_stream(self.device).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            if len(self._streams) > 64:
                self._streams.clear()
            stream = _wrap_stream(torch.cuda.current_stream(self.device), self.index)
            self._streams[ptr] = stream
        return stream

    def _run(self):
        return _OnTorchStream(self)

    @staticmethod
    def _view(t: torch.Tensor):
        """A CuPy array sharing ``t``'s memory (DLPack; 16-bit floats as int16, bool as uint8)."""
        t = t.detach()  # DLPack refuses tensors that require grad (e.g. an nn.Parameter)
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        elif t.dtype == torch.bool:
            t = t.view(torch.uint8)
        return cp.from_dlpack(t)

    def _check_device(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device != self.device:
                raise ValueError(f"the cupy backend on {self.device} got a tensor on {t.device}")

    # ---------------------------------------------------------------- statistics
    def input_stats(
        self, x: torch.Tensor, want_sum: bool = False, want_sq: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``x`` ``(n, in)`` fp32/bf16/fp16 -> ``(sum, sum_sq)`` ``(in,)`` fp32 (kernels in stats.cu).

        ``sum[j] = sum_t x[t, j]``, ``sum_sq[j] = sum_t x[t, j]^2``; one read of ``x``, fp32
        accumulation, deterministic (per-chunk partials added in a fixed order).
        """
        self._check_device(x)
        x2 = x.reshape(-1, x.shape[-1])
        suffix = _SUFFIX.get(x2.dtype)
        if suffix is None:  # float64 etc.: the reference widens/rounds with .float() as well
            x2, suffix = x2.float(), "f32"
        x2 = x2.contiguous()
        n, in_features = x2.shape
        if not (want_sum or want_sq):
            return None, None
        new = torch.zeros if n == 0 or in_features == 0 else torch.empty
        out_sum = new(in_features, dtype=torch.float32, device=self.device) if want_sum else None
        out_sq = new(in_features, dtype=torch.float32, device=self.device) if want_sq else None
        if n == 0 or in_features == 0:
            return out_sum, out_sq
        plan = launch.stats_plan(n, in_features, launch.vector_width(in_features, x2.data_ptr(), _ITEMSIZE[suffix]), self.sm_count)
        chunks = plan.chunks
        any_out = out_sum if out_sum is not None else out_sq
        with self._run():
            if chunks == 1:
                part_sum, part_sq = out_sum, out_sq
            else:
                part_sum = torch.empty((chunks, in_features), dtype=torch.float32, device=self.device) if want_sum else None
                part_sq = torch.empty((chunks, in_features), dtype=torch.float32, device=self.device) if want_sq else None
            any_part = part_sum if part_sum is not None else part_sq
            ps = self._view(part_sum if part_sum is not None else any_part)
            pq = self._view(part_sq if part_sq is not None else any_part)
            self.fn[f"stats_partial_{suffix}_v{plan.vec}"](
                (plan.col_tiles, chunks),
                (launch.STATS_THREADS,),
                (self._view(x2), _i64(n), _i32(in_features), _i64(plan.rows_per_chunk), ps, pq, _i32(want_sum), _i32(want_sq)),
            )
            if chunks > 1:
                self.fn["stats_reduce"](
                    (math.ceil(in_features / launch.REDUCE_THREADS),),
                    (launch.REDUCE_THREADS,),
                    (
                        ps,
                        pq,
                        _i32(chunks),
                        _i32(in_features),
                        self._view(out_sum if out_sum is not None else any_out),
                        self._view(out_sq if out_sq is not None else any_out),
                        _i32(want_sum),
                        _i32(want_sq),
                    ),
                )
        return out_sum, out_sq

    # ---------------------------------------------------------------- masks
    def select_mask(self, score: torch.Tensor, pattern: SparsityPattern, scope: str = "row") -> torch.Tensor:
        """``score`` ``(out, in)`` -> KEEP mask ``(out, in)`` bool, equal to ``select`` bit for bit.

        Row scope and N:M run the kernels of select.cu on ``key(score)`` with ties by index;
        ``scope="matrix"`` and float64 scores use the torch reference.
        """
        self._check_device(score)
        if score.dim() != 2:
            raise ValueError(f"score must be (out, in), got shape {tuple(score.shape)}")
        if score.dtype not in _SUFFIX or (isinstance(pattern, Unstructured) and scope != "row"):
            return self._reference.select_mask(score, pattern, scope)
        if scope not in ("row", "matrix"):
            raise ValueError(f"unknown scope {scope!r}")
        # bf16/fp16 -> fp32 is exact and order-preserving: same keys, same ties.
        score32 = score.float().contiguous()
        return self._select(pattern, score32.shape, "score", (score32,))

    def wanda_mask(self, weight: torch.Tensor, norm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
        """``weight`` ``(out, in)``, ``norm`` ``(in,)`` fp32 -> KEEP mask of ``|W_ij| * norm_j``.

        The score is computed inside the selection kernels (never stored): exact widening of
        ``W`` to fp32, then one IEEE fp32 multiply, as ``weight.abs().float() * norm``.
        """
        self._check_device(weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
        norm = norm.to(weight.device)
        if norm.dtype != torch.float32 or norm.shape != (weight.shape[1],):
            return self._reference.wanda_mask(weight, norm, pattern)
        suffix = _SUFFIX.get(weight.dtype)
        if suffix is None:  # float64: |round(w)| == round(|w|), so widening first is exact
            weight, suffix = weight.float(), "f32"
        return self._select(pattern, weight.shape, f"wanda_{suffix}", (weight.contiguous(), norm.contiguous()))

    def _select(self, pattern: SparsityPattern, shape, source: str, inputs: tuple) -> torch.Tensor:
        out_features, in_features = shape
        keep = torch.empty((out_features, in_features), dtype=torch.uint8, device=self.device)
        if keep.numel() == 0:
            return keep.view(torch.bool)
        if isinstance(pattern, Unstructured):
            k = int(in_features * pattern.sparsity)  # as select()
            if k == 0:
                return keep.fill_(1).view(torch.bool)
            name = f"select_rows_{source}"
            smem = in_features * 4
            use_smem = smem <= self.select_smem[name]
            with self._run():
                self.fn[name](
                    (out_features,),
                    (launch.SELECT_THREADS,),
                    (*[self._view(t) for t in inputs], _i32(in_features), _i32(k), _i32(use_smem), self._view(keep)),
                    shared_mem=smem if use_smem else 0,
                )
            return keep.view(torch.bool)
        if isinstance(pattern, NM):
            pattern.check_fits(in_features)
            prune = pattern.m - pattern.n_keep
            if prune == 0:
                return keep.fill_(1).view(torch.bool)
            if pattern.m > launch.MAX_NM_M:
                if source == "score":
                    return self._reference.select_mask(inputs[0], pattern)
                return self._reference.wanda_mask(inputs[0], inputs[1], pattern)
            plan = launch.nm_plan(out_features, in_features, pattern.m, self.sm_count)
            with self._run():
                self.fn[f"select_nm_{source}"](
                    (out_features, plan.grid_y),
                    (launch.NM_THREADS,),
                    (*[self._view(t) for t in inputs], _i32(in_features), _i32(pattern.m), _i32(prune), self._view(keep)),
                )
            return keep.view(torch.bool)
        raise TypeError(f"not a sparsity pattern: {pattern!r}")

    # ---------------------------------------------------------------- GEMV
    def sparse_gemv(self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``y (out,) = sum_{i kept} x_i * weight_t[i, :]``, ``weight_t`` ``(in, out)`` contiguous.

        Reads only the kept rows of ``W^T`` (gemv.cu); fp32 accumulation, deterministic;
        returns ``weight_t.dtype``.
        """
        return self._gemv(x, weight_t, keep, None, None)

    def rsparse_gemv(
        self, x: torch.Tensor, weight_t: torch.Tensor, keep: torch.Tensor, u: torch.Tensor, sv: torch.Tensor
    ) -> torch.Tensor:
        """``y (out,) = W (x * m) + U (SV (x * (1 - m)))``, ``u`` ``(out, r)``, ``sv`` ``(r, in)``.

        Three launches: the sparse partial GEMV, ``z = SV (x * (1 - m))`` (fp32, never rounded),
        and one reduction that adds the partials and ``U z`` and rounds once.
        """
        return self._gemv(x, weight_t, keep, u, sv)

    def _gemv(self, x, weight_t, keep, u, sv) -> torch.Tensor:
        check_gemv_shapes(x, weight_t, u, sv)
        self._check_device(x, weight_t, keep, *([u, sv] if u is not None else []))
        low_rank = u is not None
        suffix = _SUFFIX.get(weight_t.dtype)
        if (
            suffix is None
            or (low_rank and (u.dtype != weight_t.dtype or sv.dtype != weight_t.dtype or u.shape[1] > launch.MAX_RANK))
        ):
            if low_rank:
                return self._reference.rsparse_gemv(x, weight_t, keep, u, sv)
            return self._reference.sparse_gemv(x, weight_t, keep)
        if not weight_t.is_contiguous():
            raise ValueError("weight_t must be a contiguous (in, out) tensor (W^T, input-major)")
        in_features, out_features = weight_t.shape
        if x.dtype == weight_t.dtype:
            x_suffix = suffix
        else:  # the reference widens x with .float() too: identical inputs
            x, x_suffix = x.float(), "f32"
        x = x.contiguous()

        if keep.dtype in (torch.bool, torch.uint8):
            mask = keep_mask(keep, in_features).view(torch.uint8).contiguous()
            mode, list_len, idx = 0, in_features, mask
        elif keep.dtype in (torch.int32, torch.int64) and keep.dim() == 1:
            idx = keep.contiguous()
            mode, list_len = (1 if keep.dtype == torch.int32 else 2), keep.shape[0]
            mask = None
        else:
            idx = keep_mask(keep, in_features).view(torch.uint8)
            mask, mode, list_len = idx, 0, in_features
        if low_rank and mask is None:
            mask = keep_mask(keep, in_features).view(torch.uint8)
        rank = u.shape[1] if low_rank else 0

        y = torch.empty(out_features, dtype=weight_t.dtype, device=self.device)
        if out_features == 0:
            return y
        plan = launch.gemv_plan(
            list_len, out_features, launch.vector_width(out_features, weight_t.data_ptr(), _ITEMSIZE[suffix]), self.sm_count
        )
        chunks = plan.chunks
        with self._run():
            part = torch.empty((chunks, out_features), dtype=torch.float32, device=self.device)
            part_c = self._view(part)
            mask_c = self._view(mask if mask is not None else idx)
            idx_c = self._view(idx)
            x_c = self._view(x)
            if list_len == 0:
                part.zero_()
            else:
                self.fn[f"gemv_partial_{suffix}_{x_suffix}_v{plan.vec}"](
                    (plan.col_tiles, chunks),
                    (launch.GEMV_THREADS,),
                    (x_c, self._view(weight_t), _i32(in_features), _i32(out_features), mask_c, idx_c,
                     _i32(mode), _i32(list_len), _i32(plan.per_chunk), part_c),
                )
            if rank > 0:
                z = torch.empty(rank, dtype=torch.float32, device=self.device)
                self.fn[f"lowrank_z_{suffix}_{x_suffix}"](
                    (rank,), (launch.LOWRANK_THREADS,), (x_c, self._view(sv.contiguous()), _i32(in_features), self._view(mask), self._view(z))
                )
                u_c, z_c = self._view(u.contiguous()), self._view(z)
            else:
                u_c, z_c = part_c, part_c  # unused when rank == 0
            self.fn[f"gemv_reduce_{suffix}"](
                (math.ceil(out_features / launch.REDUCE_THREADS),),
                (launch.REDUCE_THREADS,),
                (part_c, _i32(chunks), _i32(out_features), u_c, z_c, _i32(rank), self._view(y)),
            )
        return y


    # ---------------------------------------------------------------- activation thresholds
    def activation_threshold(self, x: torch.Tensor, scale: torch.Tensor | None, k: int) -> float:
        """Exact ``k``-th smallest (1-based) of ``S[t, j] = |x[t, j]| * scale[j]`` (threshold.cu).

        ``x``: ``(n, in)`` (or ``(..., in)``) fp32/bf16/fp16; ``scale``: ``(in,)`` fp32 or ``None``
        (then ``S = |x|``). The score is computed inside the kernels (never stored): exact widening
        of ``|x|`` to fp32 and one IEEE fp32 multiply, as ``x.abs() * scale``. Radix select on the
        order key in 3 passes of 11/11/10 bits, each a histogram launch and a one-warp pick
        launch that keeps ``{prefix, k remaining}`` on the device; one host sync at the end to
        read the key, decoded back to the float. Equals ``TorchBackend.activation_threshold``
        (``S.flatten().kthvalue(k)``, NaN last); a float64 ``x`` or a scale that is not fp32
        ``(in,)`` goes to that reference. ``k`` outside ``[1, numel]`` -> ``ValueError``.
        """
        self._check_device(x)
        k = operator.index(k)
        numel = x.numel()
        if not 1 <= k <= numel:
            raise ValueError(f"activation_threshold: k = {k} is outside [1, {numel}]")
        in_features = x.shape[-1]
        if scale is not None:
            scale = scale.to(self.device)
            if scale.dtype != torch.float32 or scale.shape != (in_features,):
                return self._reference.activation_threshold(x, scale, k)
        suffix = _SUFFIX.get(x.dtype)
        if suffix is None:  # float64: |x| * scale in float64 is not what the fp32 kernels compute
            return self._reference.activation_threshold(x, scale, k)
        x2 = x.reshape(-1, in_features).contiguous()
        # a vector must not cross a row when the column picks the scale
        vec = launch.vector_width(in_features if scale is not None else numel, x2.data_ptr(), _ITEMSIZE[suffix])
        plan = launch.threshold_plan(numel, vec, self.sm_count)
        bins, passes = launch.THRESHOLD_BINS, len(launch.THRESHOLD_PASSES)
        # hist (passes, bins) zeroed for the atomics, then state {prefix, k remaining}: one buffer
        work = torch.zeros(passes * bins + 2, dtype=torch.int64, device=self.device)
        scale_t = scale.contiguous() if scale is not None else torch.empty(1, dtype=torch.float32, device=self.device)
        with self._run():
            x_c, scale_c = self._view(x2), self._view(scale_t)
            hist_c, state_c = self._view(work[: passes * bins]), self._view(work[passes * bins :])
            for p in range(passes):
                self.fn[f"threshold_hist_{suffix}"](
                    (plan.blocks,),
                    (launch.THRESHOLD_THREADS,),
                    (x_c, scale_c, _i64(numel), _i32(in_features), _i32(scale is not None), _i32(plan.vec), _i32(p),
                     state_c, hist_c),
                )
                self.fn["threshold_pick"](
                    (1,), (launch.THRESHOLD_PICK_THREADS,), (hist_c, state_c, _i32(p), _i64(k))
                )
        return key_to_float(int(work[passes * bins]))  # the one synchronisation

    # ---------------------------------------------------------------- DSnoT
    def dsnot_swap(
        self,
        W: torch.Tensor,
        What: torch.Tensor,
        keep: torch.Tensor,
        regrow_metric: torch.Tensor,
        prune_metric: torch.Tensor,
        err: torch.Tensor,
        grow_hi: torch.Tensor,
        grow_lo: torch.Tensor,
        n_grow: torch.Tensor,
        *,
        max_cycles: int,
        update_threshold: float,
        guarded: bool,
        check_sign: bool,
        prune_lists: tuple | None = None,
        m: int = 0,
        base_score: torch.Tensor | None = None,
        G: torch.Tensor | None = None,
        Gd: torch.Tensor | None = None,
        gid: torch.Tensor | None = None,
    ) -> None:
        """All of DSnoT's prune-and-grow cycles for all rows in one launch (dsnot.cu), bit-identical
        to ``DSnoT._swap_unstructured`` / ``DSnoT._swap_nm`` on the same inputs.

        ``R`` stacked rows of width ``n``, ``L = max(1, min(max_cycles, n))``: ``W``, ``What``,
        ``regrow_metric`` (``W mu``), ``prune_metric`` (``What mu``) ``(R, n)`` fp32; ``keep``
        ``(R, n)`` bool; ``err`` ``(R,)`` fp32; ``grow_hi`` / ``grow_lo`` ``(R, L)`` and ``n_grow``
        ``(R,)`` integer. Unstructured: ``prune_lists = (prune_pos, n_pos, prune_neg, n_neg)``
        (lists ``(R, L)``); N:M: ``m`` and ``base_score`` ``(R, n)``. Guarded: ``G``
        ``(n_g, n, n)``, ``gid`` ``(R,)``, ``Gd = (W - What) G`` ``(R, n)``; a swap (regrow ``j``,
        prune ``k``, ``a = -W_j``, ``b = What_k``) is kept iff
        ``dE = 2 (a Gd_j + b Gd_k) + a^2 G_jj + b^2 G_kk + 2 a b G_jk < 0``.
        ``What``, ``keep``, ``err`` (and ``Gd``) are updated in place.
        """
        if (m > 0) == (prune_lists is not None) or (m > 0 and base_score is None):
            raise ValueError("dsnot_swap needs prune_lists (unstructured) or m > 0 with base_score (N:M)")
        if guarded and (G is None or Gd is None or gid is None):
            raise ValueError("guarded dsnot_swap needs G, Gd and gid")
        rows, n = W.shape
        if rows == 0 or n == 0 or max_cycles <= 0:
            return
        self._check_device(W, What, keep, regrow_metric, prune_metric, err, grow_hi, grow_lo, n_grow)
        list_len = grow_hi.shape[1]
        lists = [grow_hi, grow_lo, *(prune_lists[0::2] if prune_lists is not None else ())]
        if any(t.shape != (rows, list_len) for t in lists):
            raise ValueError("dsnot_swap: every candidate list must have shape (rows, L) with the same L")
        outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (given, buffer) pairs to copy back

        def inout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            if t.dtype == dtype and t.is_contiguous():
                return t
            buf = t.to(dtype).contiguous()
            outputs.append((t, buf))
            return buf

        def const(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.to(dtype).contiguous()

        f32, i64 = torch.float32, torch.int64
        What_b, err_b = inout(What, f32), inout(err, f32)
        keep_b = keep if keep.dtype in (torch.bool, torch.uint8) and keep.is_contiguous() else inout(keep, torch.bool)
        args_head = [const(W, f32), What_b, keep_b, const(regrow_metric, f32), const(prune_metric, f32), err_b,
                     const(grow_hi, i64), const(grow_lo, i64), const(n_grow, i64)]
        if guarded:
            self._check_device(G, Gd, gid)
            G_b, Gd_b, gid_b = const(G, f32), inout(Gd, f32), const(gid, i64)
        else:  # unused by the kernel: any valid buffers
            G_b, Gd_b, gid_b = args_head[0], args_head[1], args_head[8]
        tail = [_i64(rows), _i32(n), _i32(max_cycles), np.float32(update_threshold), _i32(bool(guarded)),
                _i32(bool(check_sign))]
        grid = (math.ceil(rows / _DSNOT_ROWS_PER_BLOCK),)
        with self._run():
            head = [self._view(t) for t in args_head]
            gram = [self._view(G_b), self._view(Gd_b), self._view(gid_b)]
            if m:
                self._check_device(base_score)
                used = torch.zeros((rows, n), dtype=torch.uint8, device=self.device)
                self.fn["dsnot_swap_nm"](
                    grid, (_DSNOT_THREADS,),
                    (*head, _i32(list_len), self._view(const(base_score, f32)), self._view(used), _i32(m), *gram, *tail),
                )
            else:
                prune_pos, n_pos, prune_neg, n_neg = (const(t, i64) for t in prune_lists)
                self._check_device(prune_pos, n_pos, prune_neg, n_neg)
                self.fn["dsnot_swap_unstructured"](
                    grid, (_DSNOT_THREADS,),
                    (*head, *[self._view(t) for t in (prune_pos, n_pos, prune_neg, n_neg)], _i32(list_len), *gram, *tail),
                )
        for given, buf in outputs:
            given.copy_(buf)


class _OnTorchStream:
    """``with``: CuPy's current device and stream = the backend's device and torch's current stream."""

    def __init__(self, backend: CupyBackend):
        self.backend = backend

    def __enter__(self):
        self._device = cp.cuda.Device(self.backend.index)
        self._device.__enter__()
        self._stream = self.backend._stream()
        self._stream.__enter__()
        return self

    def __exit__(self, *exc):
        self._stream.__exit__(*exc)
        self._device.__exit__(*exc)
        return False


def _wrap_stream(torch_stream: torch.cuda.Stream, index: int):
    """A CuPy stream object for torch's stream (same cudaStream_t, nothing created)."""
    from_external = getattr(cp.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)  # CuPy >= 14: the CUDA stream protocol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(torch_stream.cuda_stream, index)


def key_to_float(key: int) -> float:
    """The float whose ``pc_order_key`` is ``key`` (the inverse on non-NaN floats; ``+0.0`` for
    the key both zeros share, a NaN for the NaN key ``0xffffffff``)."""
    key &= 0xFFFFFFFF
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


__all__ = ["CupyBackend", "get_cupy_backend", "key_to_float"]
