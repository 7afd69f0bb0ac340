"""GPU benchmark of the CuPy kernels against the torch backend on the same GPU.

For every kernel: the time per call (CUDA events, median of many runs after warm-up), the
bytes it must move divided by that time, that rate as a share of this device's measured
device-to-device copy bandwidth (bytes read + written per second by ``dst.copy_(src)``), and
the speedup over the torch backend. The GEMVs are also compared with the dense cuBLAS GEMV
(``x @ W^T``); the activation threshold (TEAL / WINA calibration, ``act_threshold``) with the
torch path it replaces (scores materialised, then ``kthvalue``). Each result is checked against
the torch backend (masks equal, thresholds equal, GEMV/statistics within tolerance) and the
check is shown in the table.

Timing: ``eager`` times one Python call per CUDA-event pair (launch overhead included when
the GPU waits on the CPU); ``graph`` replays the calls captured in a CUDA graph, which is the
GPU time alone (used for the µs-scale GEMVs, where Python launch overhead dominates).

    python bench/gpu_kernels.py [--quick] [--markdown FILE] [--json FILE]
    python bench/gpu_kernels.py --smoke     # checks this script on a CPU (no timings worth reading)

Needs a CUDA GPU and CuPy (``pip install '.[gpu]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prune_cli.core.patterns import NM, Unstructured
from prune_cli.core.selection import select
from prune_cli.gpu.backend import resolve_backend
from prune_cli.gpu.torch_backend import TorchBackend


@dataclass
class Row:
    kernel: str
    case: str
    bytes: int
    cupy_us: float | None = None
    torch_us: float | None = None
    dense_us: float | None = None  # GEMV only: dense cuBLAS
    timing: str = "eager"
    check: str = ""
    notes: list[str] = field(default_factory=list)

    def gbps(self, us):
        return None if not us or not self.bytes else self.bytes / (us * 1e-6) / 1e9


def median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --smoke on a CPU machine: wall clock
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def graph_ms(fn, calls: int, reps: int) -> float:
    """Median time per call of ``calls`` captured calls replayed as one CUDA graph."""
    fn()  # warm caches and allocator outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, warmup=3, reps=reps) / calls


def copy_bandwidth(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.fill_(1)
    ms = median_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * nbytes / (ms * 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    ap.add_argument("--markdown", type=Path, help="also write the table as markdown here")
    ap.add_argument("--json", type=Path, help="also write the raw rows as JSON here")
    ap.add_argument("--smoke", action="store_true",
                    help="check this script on a CPU: tiny shapes, the torch backend standing in for CuPy")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    if args.smoke:
        dev, scale = torch.device("cpu"), 16
        cupy = TorchBackend()
        device_name, sm_note = "CPU smoke run (torch vs torch)", ""
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        dev, scale = torch.device("cuda", torch.cuda.current_device()), 1
        cupy, _ = resolve_backend("cupy", dev)  # raises (exit 2) when CuPy cannot run
        props = torch.cuda.get_device_properties(dev)
        device_name, sm_note = props.name, f", {props.multi_processor_count} SMs"
    compile_s = time.perf_counter() - t0
    ref = TorchBackend()
    reps = 3 if args.smoke else 10 if args.quick else 30
    copy_bw = copy_bandwidth((1 << 30) // scale**2, dev)
    rows: list[Row] = []
    g = torch.Generator(device=dev).manual_seed(0)

    def record(row: Row, cupy_fn, torch_fn, check, dense_fn=None, graphs=False):
        try:
            row.cupy_us = 1e3 * median_ms(cupy_fn, 3, reps)
            row.torch_us = 1e3 * median_ms(torch_fn, 3, reps)
            if dense_fn is not None:
                row.dense_us = 1e3 * median_ms(dense_fn, 3, reps)
            row.check = check()
        except Exception as exc:  # keep the other rows
            row.notes.append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if graphs and row.cupy_us is not None and dev.type == "cuda":
            try:
                c = 1e3 * graph_ms(cupy_fn, 20, reps)
                t = 1e3 * graph_ms(torch_fn, 20, reps)
                d = 1e3 * graph_ms(dense_fn, 20, reps) if dense_fn is not None else None
                row.cupy_us, row.torch_us, row.dense_us, row.timing = c, t, d, "graph"
            except Exception as exc:
                torch.cuda.synchronize()
                row.notes.append(f"graph capture failed ({type(exc).__name__}); eager times")
        rows.append(row)
        print(format_row(row, copy_bw), flush=True)

    print(f"device: {device_name}{sm_note}; torch {torch.__version__}; "
          f"kernel compile/load {compile_s:.1f} s; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)", flush=True)
    print(HEADER, flush=True)

    # --- calibration statistics
    stats_cases = [((16384, 4096), torch.bfloat16, False), ((8192, 4096), torch.float32, True)]
    if not args.quick:
        stats_cases.append(((16384, 11008), torch.bfloat16, True))
    for shape, dtype, want_sum in stats_cases:
        shape = (shape[0] // scale, shape[1] // scale)
        x = torch.randn(shape, generator=g, device=dev).to(dtype)
        nbytes = x.numel() * x.element_size() + shape[1] * 4 * (2 if want_sum else 1)

        def check(x=x, want_sum=want_sum):
            a, b = cupy.input_stats(x, want_sum, True), ref.input_stats(x, want_sum, True)
            err = max(float(((p - q).abs() / q.abs().clamp_min(1e-6)).max()) for p, q in zip(a, b) if p is not None)
            return f"rel {err:.1e}"

        record(
            Row("input_stats", f"{shape[0]}x{shape[1]} {str(dtype)[6:]} {'Σx,Σx²' if want_sum else 'Σx²'}", nbytes),
            lambda x=x, w=want_sum: cupy.input_stats(x, w, True),
            lambda x=x, w=want_sum: ref.input_stats(x, w, True),
            check,
        )
        del x

    # --- mask selection on a given score
    select_cases = [((4096, 11008), Unstructured(0.5)), ((11008, 4096), Unstructured(0.5)), ((11008, 4096), NM(2, 4))]
    if args.quick:
        select_cases = select_cases[1:]
    for shape, pattern in select_cases:
        shape = (shape[0] // scale, shape[1] // scale)
        score = torch.rand(shape, generator=g, device=dev)
        nbytes = score.numel() * 4 + score.numel()

        def check(score=score, pattern=pattern):
            return "equal" if torch.equal(cupy.select_mask(score, pattern), select(score, pattern)) else "DIFFERENT"

        record(
            Row("select_mask", f"{shape[0]}x{shape[1]} fp32 {pattern.describe()}", nbytes),
            lambda s=score, p=pattern: cupy.select_mask(s, p),
            lambda s=score, p=pattern: ref.select_mask(s, p),
            check,
        )
        del score

    # --- Wanda: score fused into the selection
    wanda_cases = [((11008, 4096), Unstructured(0.5)), ((4096, 11008), Unstructured(0.5)), ((11008, 4096), NM(2, 4))]
    for shape, pattern in wanda_cases:
        shape = (shape[0] // scale, shape[1] // scale)
        weight = (torch.randn(shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
        norm = torch.rand(shape[1], generator=g, device=dev) * 10
        nbytes = weight.numel() * 2 + shape[1] * 4 + weight.numel()

        def check(w=weight, n=norm, p=pattern):
            return "equal" if torch.equal(cupy.wanda_mask(w, n, p), ref.wanda_mask(w, n, p)) else "DIFFERENT"

        record(
            Row("wanda_mask", f"{shape[0]}x{shape[1]} bf16 {pattern.describe()}", nbytes),
            lambda w=weight, n=norm, p=pattern: cupy.wanda_mask(w, n, p),
            lambda w=weight, n=norm, p=pattern: ref.wanda_mask(w, n, p),
            check,
        )
        del weight

    # --- activation thresholds (TEAL / WINA calibration): exact k-th value of |x| (* scale)
    for shape, dtype, scaled in threshold_cases(args.quick):
        shape = (shape[0] // scale, shape[1] // scale)
        try:
            row = bench_threshold(cupy, ref, shape, dtype, scaled, g, dev, reps)
        except Exception as exc:  # keep the other rows
            row = Row("act_threshold", f"{shape[0]}x{shape[1]} {str(dtype)[6:]}", 0)
            row.notes.append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        rows.append(row)
        print(format_row(row, copy_bw), flush=True)

    # --- decode GEMVs (batch 1), 50% of the input channels kept
    gemv_cases = [(4096, 4096), (4096, 11008), (11008, 4096)]
    if args.quick:
        gemv_cases = gemv_cases[1:2]
    for in_f, out_f in gemv_cases:
        big = (in_f, out_f) == (4096, 11008)
        in_f, out_f = in_f // scale, out_f // scale
        weight_t = (torch.randn(in_f, out_f, generator=g, device=dev) * 0.02).to(torch.bfloat16)
        x = torch.randn(in_f, generator=g, device=dev).to(torch.bfloat16)
        idx = torch.randperm(in_f, generator=g, device=dev)[: in_f // 2].sort().values
        nbytes = idx.numel() * out_f * 2 + in_f * 2 + idx.numel() * 8 + out_f * 2

        def check(x=x, w=weight_t, i=idx):
            a, b = cupy.sparse_gemv(x, w, i).float(), ref.sparse_gemv(x, w, i).float()
            return f"rel {float((a - b).norm() / b.norm()):.1e}"

        record(
            Row("sparse_gemv", f"W^T {in_f}x{out_f} bf16, 50% kept", nbytes),
            lambda x=x, w=weight_t, i=idx: cupy.sparse_gemv(x, w, i),
            lambda x=x, w=weight_t, i=idx: ref.sparse_gemv(x, w, i),
            check,
            dense_fn=lambda x=x, w=weight_t: x @ w,
            graphs=True,
        )
        if big or args.quick:
            rank = 128
            u = (torch.randn(out_f, rank, generator=g, device=dev) * 0.05).to(torch.bfloat16)
            sv = (torch.randn(rank, in_f, generator=g, device=dev) * 0.05).to(torch.bfloat16)
            lr_bytes = nbytes + (out_f + in_f) * rank * 2

            def check_r(x=x, w=weight_t, i=idx, u=u, sv=sv):
                a, b = cupy.rsparse_gemv(x, w, i, u, sv).float(), ref.rsparse_gemv(x, w, i, u, sv).float()
                return f"rel {float((a - b).norm() / b.norm()):.1e}"

            record(
                Row("rsparse_gemv", f"W^T {in_f}x{out_f} bf16, 50% kept, r={rank}", lr_bytes),
                lambda x=x, w=weight_t, i=idx, u=u, sv=sv: cupy.rsparse_gemv(x, w, i, u, sv),
                lambda x=x, w=weight_t, i=idx, u=u, sv=sv: ref.rsparse_gemv(x, w, i, u, sv),
                check_r,
                dense_fn=lambda x=x, w=weight_t: x @ w,
                graphs=True,
            )
        del weight_t

    # --- DSnoT prune-and-grow cycles: one kernel launch vs the torch loop (~25 small ops a cycle)
    dsnot_speedups = []
    for pattern in (Unstructured(0.6), NM(2, 4)):
        for width, batch in dsnot_block(dev, g, scale):
            try:
                row, speed = bench_dsnot(cupy, pattern, width, batch, reps)
            except Exception as exc:  # keep the other rows
                row, speed = Row("dsnot_swap", f"{width} wide, {pattern.describe()}", 0), None
                row.notes.append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            rows.append(row)
            print(format_row(row, copy_bw), flush=True)
            if speed is not None:
                dsnot_speedups.append(speed)
    if args.smoke:
        print("dsnot_swap: smoke run (the torch loop on both sides); no speedup to read", flush=True)
    elif dsnot_speedups:
        worst = min(dsnot_speedups)
        print(f"dsnot_swap: speedup over the torch loop {worst:.1f}x at worst (goal >= 10x): "
              f"{'met' if worst >= 10 else 'NOT met'}", flush=True)

    table = markdown(rows, device_name, copy_bw, compile_s)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "copy_bandwidth": copy_bw,
                                         "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)
    bad = [r for r in rows if r.notes and any(n.startswith("failed") for n in r.notes) or "DIFFERENT" in r.check]
    return 1 if bad else 0


def threshold_cases(quick: bool):
    """(tokens x in, dtype, scaled): calibration inputs as the activation stage sees them (fp32,
    16384 tokens: the default max_tokens), TEAL on a 4096-wide input, WINA (``|x| * ||W_:,j||``)
    on an 11008-wide one, and a bf16 input."""
    cases = [((16384, 4096), torch.float32, False), ((16384, 11008), torch.float32, True),
             ((16384, 4096), torch.bfloat16, True)]
    return cases[:1] if quick else cases


def bench_threshold(backend, ref, shape, dtype, scaled: bool, g, dev, reps: int) -> Row:
    """Time ``activation_threshold`` (threshold.cu: 3 histogram passes over ``x``, the select state
    kept on the GPU, one host sync for the result) against the torch reference (``|x| (* c)``
    materialised, then ``kthvalue``: what ``quantile_threshold`` does with the torch backend), at
    k = 50% of the entries, and check both give the same float. Bytes: the 3 reads of ``x`` (and
    the scale). Torch's single-slice ``kthvalue`` takes up to seconds here, so it gets fewer
    repetitions (median of at least 3)."""
    x = (torch.randn(shape, generator=g, device=dev) * torch.rand(shape[1], generator=g, device=dev)).to(dtype)
    col = torch.rand(shape[1], generator=g, device=dev) * 10 if scaled else None
    k = round(0.5 * x.numel())
    nbytes = 3 * x.numel() * x.element_size() + (shape[1] * 4 if scaled else 0)
    row = Row("act_threshold", f"{shape[0]}x{shape[1]} {str(dtype)[6:]} {'|x|*c' if scaled else '|x|'}, k=50%", nbytes)
    got, want = backend.activation_threshold(x, col, k), ref.activation_threshold(x, col, k)
    same = torch.tensor(got).view(torch.int32) == torch.tensor(want).view(torch.int32)
    row.cupy_us = 1e3 * median_ms(lambda: backend.activation_threshold(x, col, k), 3, reps)
    row.torch_us = 1e3 * median_ms(lambda: ref.activation_threshold(x, col, k), 1, max(3, reps // 10))
    row.check = "equal" if bool(same) else "DIFFERENT"
    row.notes.append("3 passes over x, counted 3x; times include the one host sync")
    return row


def dsnot_block(dev, g, scale: int):
    """A Llama-like block (SmolLM2-135M shapes: hidden 576, MLP 1536, 9 query / 3 KV heads of 64):
    per width, the Linears DSnoT stacks into one swap loop, as ``(weight, stats)`` pairs. q, k, v
    share one input (one Gram matrix), gate and up another; o and down read their own."""
    from prune_cli.calibrators.stats import InputStats, Stat

    hidden, mlp, kv = 576 // scale, 1536 // scale, 192 // scale

    def stats(width):
        x = torch.randn(2048 // scale, width, generator=g, device=dev)
        x = x @ (torch.eye(width, device=dev) + torch.randn(width, width, generator=g, device=dev) / width**0.5)
        x = x + torch.randn(width, generator=g, device=dev)
        s = InputStats(width, frozenset({Stat.SQ_NORM, Stat.MEAN_VAR, Stat.GRAM}), tokens_per_window=256 // scale)
        s.update(x)
        return s

    def weight(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g, device=dev) * 0.02

    attn, o_in, mlp_in, down_in = stats(hidden), stats(hidden), stats(hidden), stats(mlp)
    narrow = [(weight(hidden, hidden), attn), (weight(kv, hidden), attn), (weight(kv, hidden), attn),
              (weight(hidden, hidden), o_in), (weight(mlp, hidden), mlp_in), (weight(mlp, hidden), mlp_in)]
    return [(hidden, narrow), (mlp, [(weight(hidden, mlp), down_in)])]


def bench_dsnot(backend, pattern, width: int, batch, reps: int):
    """Time the guarded swap loop (50 cycles) of one stacked batch: the backend's ``dsnot_swap``
    kernel vs ``DSnoT._swap_unstructured`` / ``_swap_nm``, both from the same state (restored
    before every timed call, outside the timed region), and check the results are bit-identical.
    Unstructured, the torch backend really runs ``DSnoT._swap_in_list_order``: it is timed too
    (with its list building) and the speedup returned is against the faster torch path."""
    from prune_cli.methods import build_method
    from prune_cli.methods.dsnot import _Part, _Rows, _SwapState

    dsnot = build_method("dsnot", {"mode": "guarded"})
    m = pattern.m if isinstance(pattern, NM) else 0
    base = dsnot.base_method()
    jobs = [(w, s, pattern) for w, s in batch]
    rows = _Rows.stack([_Part(job, base.prune(*job), base, m) for job in jobs], True)
    state = _SwapState(dsnot, rows, dsnot._sign_check(pattern))
    lists = None if m else dsnot._prune_lists(state, rows)
    pristine = {name: t.clone() for name, t in (("What", rows.What), ("keep", rows.keep), ("Gd", rows.Gd))}
    err0 = state.err.clone()
    kernel = getattr(backend, "dsnot_swap", None)

    def restore():
        for name, t in pristine.items():
            getattr(rows, name).copy_(t)
        state.err = rows.err = err0.clone()
        state.active = torch.ones_like(state.active)
        state.ptr_hi.zero_()
        state.ptr_lo.zero_()

    def torch_loop():
        if m:
            dsnot._swap_nm(state, rows, m)
        else:
            dsnot._swap_unstructured(state, lists)

    def on_kernel():
        if kernel is None:  # --smoke: the torch backend has no kernel; time the loop twice
            return torch_loop()
        dsnot._swap_kernel(kernel, state, rows, lists, m)

    def snapshot():
        return [t.clone() for t in (rows.What, rows.keep, rows.Gd, state.err)]

    def timed(fn, n, setup=restore):
        """Median µs of ``n`` calls of ``fn``, each after ``setup`` (outside the timed region)."""
        times = []
        for _ in range(n):
            setup()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
        return 1e3 * statistics.median(times)

    restore()
    torch_loop()
    want = snapshot()
    restore()
    on_kernel()
    got = snapshot()
    same = all(torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b) for a, b in zip(got, want))
    changed = int((want[1] != pristine["keep"]).sum())
    timed(on_kernel, 2)  # warm-up
    row = Row("dsnot_swap", f"{rows.W.shape[0]}x{width} {pattern.describe()} guarded", 0, timing="eager")
    row.cupy_us = timed(on_kernel, reps)
    row.torch_us = timed(torch_loop, max(3, reps // 6))
    row.check = "equal" if same else "DIFFERENT"
    row.notes.append(f"{changed} mask entries changed")
    best_torch = row.torch_us
    if dsnot._walks_lists_in_order(m, state.check_sign, False):
        # the torch backend's actual unstructured path: DSnoT._swap_in_list_order, timed with its
        # own list building (the kernel row above excludes list building: a conservative baseline)
        from prune_cli.methods.base import PruneResult

        initial = [base.prune(*job) for job in jobs]

        def fresh_parts():
            return [_Part(job, PruneResult(r.weight.clone(), r.mask.clone()), base, m) for job, r in zip(jobs, initial)]

        parts = fresh_parts()
        dsnot._swap_in_list_order(parts)
        list_same = torch.equal(torch.cat([p.keep for p in parts]), want[1]) and torch.equal(
            torch.cat([p.What for p in parts]).view(torch.int32), want[0].view(torch.int32))
        current: dict = {}

        def new_parts():
            current["parts"] = fresh_parts()

        list_us = timed(lambda: dsnot._swap_in_list_order(current["parts"]), max(3, reps // 6), setup=new_parts)
        best_torch = min(best_torch, list_us)
        row.notes.append(f"torch list-order path {list_us:.0f} µs incl. list building ({'equal' if list_same else 'DIFFERENT'})")
        if not list_same:
            row.check = "DIFFERENT"
    return row, best_torch / row.cupy_us


HEADER = (f"{'kernel':<13} {'case':<38} {'cupy µs':>9} {'torch µs':>9} {'speedup':>8} {'GB/s':>7} {'% copy':>7} "
          f"{'dense µs':>9} {'vs dense':>8} {'timing':>6}  check")


def _f(v, fmt, suffix=""):
    return "-" if v is None else format(v, fmt) + suffix


def format_row(r: Row, copy_bw: float) -> str:
    gbps = r.gbps(r.cupy_us)
    share = None if gbps is None else 100 * gbps * 1e9 / copy_bw
    speed = r.torch_us / r.cupy_us if r.cupy_us and r.torch_us else None
    dense = r.dense_us / r.cupy_us if r.cupy_us and r.dense_us else None
    return (f"{r.kernel:<13} {r.case:<38} {_f(r.cupy_us, '9.1f'):>9} {_f(r.torch_us, '9.1f'):>9} "
            f"{_f(speed, '.2f', 'x'):>8} {_f(gbps, '7.0f'):>7} {_f(share, '.0f', '%'):>7} {_f(r.dense_us, '9.1f'):>9} "
            f"{_f(dense, '.2f', 'x'):>8} {r.timing:>6}  {r.check} {'; '.join(r.notes)}")


def markdown(rows: list[Row], device: str, copy_bw: float, compile_s: float) -> str:
    lines = [
        f"Device: {device}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write, 1 GiB `copy_`); "
        f"torch {torch.__version__}; kernel compile/load {compile_s:.1f} s.",
        "",
        "| kernel | case | cupy µs | torch µs | speedup | GB/s | % of copy BW | dense cuBLAS µs | vs dense | timing | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        gbps = r.gbps(r.cupy_us)
        share = None if gbps is None else 100 * gbps * 1e9 / copy_bw
        speed = r.torch_us / r.cupy_us if r.cupy_us and r.torch_us else None
        dense = r.dense_us / r.cupy_us if r.cupy_us and r.dense_us else None
        lines.append(
            f"| {r.kernel} | {r.case} | {_f(r.cupy_us, '.1f')} | {_f(r.torch_us, '.1f')} | {_f(speed, '.2f', '×')} | "
            f"{_f(gbps, '.0f')} | {_f(share, '.0f', '%')} | {_f(r.dense_us, '.1f')} | {_f(dense, '.2f', '×')} | {r.timing} | "
            f"{r.check}{' ' + '; '.join(r.notes) if r.notes else ''} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
