"""A CPU stand-in for ``cupy`` that runs the CuPy backend's host code without a GPU.

``from_dlpack`` hands the torch tensor through; every ``RawModule`` kernel is replaced by a
Python emulation (built on the line-by-line models of kernel_model.py) that reads its
arguments exactly as the CUDA kernel's parameter list does. When NVRTC is installed, each call
is also checked against the kernel's real PTX signature (number of parameters, and 8-byte
pointers / 4-byte ints / 8-byte ints in the right places), which is how CuPy packs them.
"""

from __future__ import annotations

import re
import types
from functools import lru_cache

import numpy as np
import torch

from prune_cli.gpu import kernel_source
from tests.gpu import kernel_model as km

FLOAT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


@lru_cache(maxsize=1)
def ptx_signatures() -> dict[str, list[int]] | None:
    """kernel name -> parameter sizes in bytes, from NVRTC's PTX (None without NVRTC)."""
    from prune_cli.gpu import nvrtc

    try:
        compiler = nvrtc.load_nvrtc()
    except nvrtc.NvrtcNotFound:
        return None
    sigs = {}
    for module in kernel_source.KERNELS:
        ptx = compiler.compile(kernel_source.module_source(module), "compute_80", f"{module}.cu").image.decode()
        for name, params in re.findall(r"\.entry\s+(\w+)\(\s*(.*?)\)", ptx, re.S):
            sigs[name] = [int(t[1:]) // 8 for t in re.findall(r"\.param\s+\.([usbf]\d+)", params)]
    return sigs


def _arg_size(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return 8  # a device pointer
    if isinstance(arg, np.generic):
        return arg.itemsize
    raise TypeError(f"kernel argument of type {type(arg).__name__}: CuPy would guess its C type")


def _floats(t: torch.Tensor, suffix: str) -> torch.Tensor:
    """The values of a kernel input (16-bit floats arrive as int16 bit views)."""
    return t.view(FLOAT[suffix]).float() if suffix != "f32" else t


class Kernel:
    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log
        self.shared_size_bytes = 1168
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, shared_mem=0):
        sigs = ptx_signatures()
        if sigs is not None:
            sizes = [_arg_size(a) for a in args]
            assert sizes == sigs[self.name], f"{self.name}: passed {sizes}, PTX takes {sigs[self.name]}"
        assert shared_mem <= self.max_dynamic_shared_size_bytes or shared_mem == 0
        self.log.append(self.name)
        family = "_".join(self.name.split("_")[:2])  # stats_partial, select_rows, gemv_reduce, ...
        getattr(self, "_" + family)(grid, block, args, shared_mem)

    # stats_partial_<d>_v<V>(x, n, in, rows_per_chunk, part_sum, part_sq, want_sum, want_sq)
    def _stats_partial(self, grid, block, args, shared_mem):
        suffix, vec = self.name.split("_")[2], int(self.name.split("_v")[-1])
        x, n, in_f, rpc, ps, pq, want_sum, want_sq = args
        assert x.dtype == (torch.float32 if suffix == "f32" else torch.int16)
        assert grid[0] * block[0] * vec >= in_f and (vec == 1 or in_f % vec == 0)
        xf = _floats(x, suffix).reshape(int(n), int(in_f))
        for c in range(grid[1]):
            rows = xf[c * int(rpc) : min(int(n), (c + 1) * int(rpc))]
            assert rows.shape[0] > 0
            if want_sum:
                ps.view(-1)[c * int(in_f) : (c + 1) * int(in_f)] = rows.sum(0)
            if want_sq:
                pq.view(-1)[c * int(in_f) : (c + 1) * int(in_f)] = rows.square().sum(0)

    # stats_reduce(part_sum, part_sq, chunks, in, out_sum, out_sq, want_sum, want_sq)
    def _stats_reduce(self, grid, block, args, shared_mem):
        ps, pq, chunks, in_f, out_sum, out_sq, want_sum, want_sq = args
        assert grid[0] * block[0] >= in_f
        if want_sum:
            out_sum.copy_(ps.view(int(chunks), int(in_f)).sum(0))
        if want_sq:
            out_sq.copy_(pq.view(int(chunks), int(in_f)).sum(0))

    def _keys(self, args):
        if self.name.endswith("_score"):
            score, rest = args[0], args[1:]
            return km.order_key(score.numpy()), rest
        suffix = self.name.split("_")[-1]
        weight, norm, rest = args[0], args[1], args[2:]
        return km.wanda_keys(_floats(weight, suffix).numpy(), norm.numpy()), rest

    # select_rows_*(score | weight, norm, in, k, use_smem, keep)
    def _select_rows(self, grid, block, args, shared_mem):
        keys, (in_f, k, use_smem, keep) = self._keys(args)
        keys = keys.reshape(-1, int(in_f))
        assert grid[0] == keys.shape[0] and block[0] == 512
        assert shared_mem == (int(in_f) * 4 if use_smem else 0)
        keep.view(-1).copy_(torch.from_numpy(km.select_rows_keep(keys, int(k)).reshape(-1)).to(torch.uint8))

    # select_nm_*(score | weight, norm, in, m, prune, keep)
    def _select_nm(self, grid, block, args, shared_mem):
        keys, (in_f, m, prune, keep) = self._keys(args)
        keys = keys.reshape(-1, int(in_f))
        assert grid[0] == keys.shape[0] and 1 <= grid[1] <= 65535 and block[0] == 256
        keep.view(-1).copy_(torch.from_numpy(km.select_nm_keep(keys, int(m), int(prune)).reshape(-1)).to(torch.uint8))

    # gemv_partial_<w>_<x>_v<V>(x, wt, in, out, mask, idx, mode, list_len, per_chunk, part)
    def _gemv_partial(self, grid, block, args, shared_mem):
        _, _, w_suffix, x_suffix, v = self.name.split("_")
        vec = int(v[1:])
        x, wt, in_f, out_f, mask, idx, mode, list_len, per_chunk, part = args
        in_f, out_f, mode, list_len, per_chunk = map(int, (in_f, out_f, mode, list_len, per_chunk))
        assert grid[0] * block[0] * vec >= out_f and (vec == 1 or out_f % vec == 0)
        assert {0: torch.uint8, 1: torch.int32, 2: torch.int64}[mode] == (mask.dtype if mode == 0 else idx.dtype)
        xf, wf = _floats(x, x_suffix).double(), _floats(wt, w_suffix).double().view(in_f, out_f)
        for c in range(grid[1]):
            positions = torch.arange(c * per_chunk, min(list_len, (c + 1) * per_chunk))
            rows = positions[mask[positions].bool()] if mode == 0 else idx[positions].long()
            part.view(grid[1], out_f)[c] = (xf[rows] @ wf[rows]).float()

    # lowrank_z_<w>_<x>(x, sv, in, mask, z)
    def _lowrank_z(self, grid, block, args, shared_mem):
        _, _, w_suffix, x_suffix = self.name.split("_")
        x, sv, in_f, mask, z = args
        dropped = (mask == 0).double()
        z.copy_((_floats(sv, w_suffix).double().view(-1, int(in_f)) @ (_floats(x, x_suffix).double() * dropped)).float())
        assert grid[0] == z.numel()

    # gemv_reduce_<w>(part, chunks, out, u, z, rank, y)
    def _gemv_reduce(self, grid, block, args, shared_mem):
        suffix = self.name.split("_")[-1]
        part, chunks, out_f, u, z, rank, y = args
        assert grid[0] * block[0] >= out_f and int(rank) <= 1024
        acc = part.view(-1)[: int(chunks) * int(out_f)].view(int(chunks), int(out_f)).sum(0)
        if int(rank):
            acc = acc + _floats(u, suffix).view(int(out_f), int(rank)) @ z
        if suffix == "f32":
            y.copy_(acc)
        else:
            y.view(FLOAT[suffix]).copy_(acc.to(FLOAT[suffix]))


    # dsnot_swap_unstructured(W, What, keep, regrow, prune, err, grow_hi, grow_lo, n_grow,
    #     prune_pos, n_pos, prune_neg, n_neg, list_len, G, Gd, gid, rows, n, max_cycles, threshold, guarded, check_sign)
    # dsnot_swap_nm(W, What, keep, regrow, prune, err, grow_hi, grow_lo, n_grow,
    #     list_len, score, used, m, G, Gd, gid, rows, n, max_cycles, threshold, guarded, check_sign)
    def _dsnot_swap(self, grid, block, args, shared_mem):
        nm = self.name == "dsnot_swap_nm"
        head, rest = args[:9], args[9:]
        if nm:
            (list_len, score, used, m), rest = rest[:4], rest[4:]
        else:
            (prune_pos, n_pos, prune_neg, n_neg, list_len), rest = rest[:5], rest[5:]
        G, Gd, gid, rows, n, max_cycles, threshold, guarded, check_sign = rest
        rows, n, list_len = int(rows), int(n), int(list_len)
        assert block[0] == 128 and grid[0] * 4 >= rows > (grid[0] - 1) * 4 and shared_mem == 0
        assert isinstance(threshold, np.float32)
        W, What, keep, regrow, prune, err, grow_hi, grow_lo, n_grow = head
        for t in (W, What, regrow, prune, err, G, Gd):
            assert t.dtype == torch.float32 and t.is_contiguous()
        for t in (grow_hi, grow_lo, n_grow, gid, *(() if nm else (prune_pos, n_pos, prune_neg, n_neg))):
            assert t.dtype == torch.int64 and t.is_contiguous()
        assert keep.dtype == torch.uint8 and keep.shape == (rows, n) and grow_hi.shape == (rows, list_len)

        def mat(t, shape=(rows, n)):
            return t.numpy().reshape(shape)  # shares memory: in-place updates reach the tensors

        kw = {}
        if int(guarded):
            kw = {"G": mat(G, (-1, n, n)), "Gd": mat(Gd), "gid": gid.numpy()}
        if nm:
            assert used.dtype == torch.uint8 and not used.any()
            kw.update(m=int(m), score=mat(score), used=mat(used))
        else:
            lists = (rows, list_len)
            kw.update(prune_pos=mat(prune_pos, lists), n_pos=n_pos.numpy(), prune_neg=mat(prune_neg, lists),
                      n_neg=n_neg.numpy())
        with np.errstate(all="ignore"):
            km.dsnot_swap(
                mat(W), mat(What), mat(keep), mat(regrow), mat(prune), err.numpy(), mat(grow_hi, (rows, list_len)),
                mat(grow_lo, (rows, list_len)), n_grow.numpy(), max_cycles=int(max_cycles), threshold=threshold,
                guarded=bool(int(guarded)), check_sign=bool(int(check_sign)), **kw,
            )


    # threshold_hist_<d>(x, scale, numel, in, use_scale, vec, pass, state, hist)
    def _threshold_hist(self, grid, block, args, shared_mem):
        suffix = self.name.split("_")[-1]
        x, scale, numel, in_f, use_scale, vec, p, state, hist = args
        numel, in_f, use_scale, vec, p = map(int, (numel, in_f, use_scale, vec, p))
        assert block == (256,) and shared_mem == 0 and len(grid) == 1 and grid[0] >= 1
        assert x.dtype == (torch.float32 if suffix == "f32" else torch.int16) and x.is_contiguous()
        assert x.numel() == numel and numel % in_f == 0 and 0 <= p < 3
        assert vec in (1, 16 // x.element_size()) and numel % vec == 0
        if vec > 1:
            assert x.data_ptr() % 16 == 0 and (not use_scale or in_f % vec == 0)
        assert hist.dtype == torch.int64 and hist.shape == (3 * 2048,) and state.dtype == torch.int64 and state.shape == (2,)
        if use_scale:
            assert scale.dtype == torch.float32 and scale.shape == (in_f,) and scale.is_contiguous()
        xf = _floats(x, suffix).reshape(-1, in_f).numpy()
        keys = km.threshold_keys(xf, scale.numpy() if use_scale else None)
        prefix = 0 if p == 0 else int(state[0])  # pass 0 reads no state
        counts = km.threshold_hist(keys, p, prefix, grid[0], vec)
        hist.view(3, 2048)[p] += torch.from_numpy(counts.astype(np.int64))  # atomicAdd into what is there

    # threshold_pick(hist, state, pass, k)
    def _threshold_pick(self, grid, block, args, shared_mem):
        hist, state, p, k = args
        p = int(p)
        assert grid == (1,) and block == (32,) and shared_mem == 0
        assert isinstance(k, np.int64) and int(k) >= 1
        prefix, need = (0, int(k)) if p == 0 else (int(state[0]), int(state[1]))
        prefix, need = km.threshold_pick(hist.view(3, 2048)[p].numpy(), p, prefix, need)
        state[0], state[1] = prefix, need


class _Ctx:
    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_fake_cupy(log: list) -> types.ModuleType:
    fake = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, code):
            assert 'extern "C"' in code
            self.code = code

        def compile(self):
            pass

        def get_function(self, name):
            return Kernel(name, log)

    class Stream(_Ctx):
        @classmethod
        def from_external(cls, obj):
            assert hasattr(obj, "__cuda_stream__")
            return cls()

    fake.RawModule = RawModule
    fake.from_dlpack = lambda t: t
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            deviceGetAttribute=lambda attr, dev: 132 if attr == 16 else 232448,
            cudaDevAttrMultiProcessorCount=16,
            cudaDevAttrMaxSharedMemoryPerBlockOptin=97,
        ),
        Device=_Ctx,
        Stream=Stream,
        ExternalStream=Stream,
    )
    return fake


class FakeTorchStream:
    cuda_stream = 0

    def __cuda_stream__(self):
        return (0, 0)
