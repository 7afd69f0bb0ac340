"""The CUDA C++ sources of the CuPy backend and the names of their kernels.

Kernels live in ``gpu/kernels/*.cu`` (package data). ``common.cu`` holds the shared device
helpers and is prepended to every module, so each module is one self-contained translation
unit that NVRTC compiles with no CUDA header and no driver (see :mod:`prune_cli.gpu.nvrtc`).
This module imports nothing beyond the standard library.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
COMMON = "common.cu"

# dtype suffix used in kernel names -> bytes per element
DTYPES = {"f32": 4, "bf16": 2, "f16": 2}
# widest vector per thread: 16 bytes
VEC = {name: 16 // size for name, size in DTYPES.items()}
# (weight dtype, activation dtype) pairs of the GEMV kernels: x in the weight's dtype or fp32
GEMV_PAIRS = (("f32", "f32"), ("bf16", "bf16"), ("bf16", "f32"), ("f16", "f16"), ("f16", "f32"))


def _names() -> dict[str, tuple[str, ...]]:
    stats = [f"stats_partial_{d}_v{v}" for d in DTYPES for v in (1, VEC[d])] + ["stats_reduce"]
    select = ["select_rows_score", "select_nm_score"]
    select += [f"select_{kind}_wanda_{d}" for d in DTYPES for kind in ("rows", "nm")]
    gemv = [f"gemv_partial_{w}_{x}_v{v}" for w, x in GEMV_PAIRS for v in (1, VEC[w])]
    gemv += [f"lowrank_z_{w}_{x}" for w, x in GEMV_PAIRS]
    gemv += [f"gemv_reduce_{d}" for d in DTYPES]
    dsnot = ["dsnot_swap_unstructured", "dsnot_swap_nm"]
    threshold = [f"threshold_hist_{d}" for d in DTYPES] + ["threshold_pick"]
    return {"stats": tuple(stats), "select": tuple(select), "gemv": tuple(gemv), "dsnot": tuple(dsnot),
            "threshold": tuple(threshold)}


# module name -> the extern "C" kernels it defines
KERNELS: dict[str, tuple[str, ...]] = _names()


@cache
def module_source(module: str) -> str:
    """The full source of one module: ``common.cu`` followed by ``<module>.cu``."""
    if module not in KERNELS:
        raise KeyError(f"unknown kernel module {module!r}; known: {', '.join(KERNELS)}")
    common = (KERNEL_DIR / COMMON).read_text()
    body = (KERNEL_DIR / f"{module}.cu").read_text()
    return f'#line 1 "{COMMON}"\n{common}\n#line 1 "{module}.cu"\n{body}'
