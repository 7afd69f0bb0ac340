"""Compile CUDA C++ with NVRTC through ctypes: no GPU, no driver, no CuPy needed.

NVRTC is a plain shared library (``libnvrtc.so``); it turns CUDA C++ into PTX (``compute_XX``)
or, through its built-in ptxas, into a cubin (``sm_XX``) without touching a GPU. The PyPI wheels
``nvidia-cuda-nvrtc-cu12`` / ``nvidia-cuda-nvrtc`` ship it; a CUDA toolkit install works too.
This is what lets CI check on a CPU machine that every kernel compiles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
from dataclasses import dataclass
from functools import lru_cache

# What CuPy adds to every RawModule compile (cupy/cuda/compiler.py); compiling with the same
# flags here checks the code CuPy will actually build.
CUPY_LIKE_OPTIONS: tuple[str, ...] = ("-ftz=true",)


class NvrtcNotFound(RuntimeError):
    """No loadable libnvrtc on this machine."""


class NvrtcCompileError(RuntimeError):
    """NVRTC rejected the source; the message carries the compiler log."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n{log}")
        self.log = log


@dataclass(frozen=True)
class CompiledModule:
    arch: str  # e.g. "sm_90" (cubin) or "compute_90" (PTX)
    image: bytes  # cubin or PTX bytes
    log: str

    @property
    def is_ptx(self) -> bool:
        return self.arch.startswith("compute_")

    def entries(self) -> list[str]:
        """Kernel entry points (PTX only)."""
        if not self.is_ptx:
            raise ValueError("entries are read from PTX; compile for compute_XX")
        return re.findall(r"^\s*\.(?:visible\s+)?\.entry\s+([A-Za-z_][A-Za-z0-9_]*)", self.image.decode(), re.M)


def _candidates() -> list[str]:
    found: list[str] = []
    # 1. the nvidia-* wheels (namespace package `nvidia`): cu12 puts it in nvidia/cuda_nvrtc/lib,
    #    CUDA 13 wheels in nvidia/cu13/lib; look at every folder of the namespace.
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        for pattern in ("*/lib/libnvrtc.so*", "*/lib64/libnvrtc.so*", "*/bin/nvrtc64_*.dll"):
            found += sorted(glob.glob(os.path.join(root, pattern)), reverse=True)
    # 2. an installed toolkit
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            found += sorted(glob.glob(os.path.join(os.environ[env], "lib64", "libnvrtc.so*")), reverse=True)
    found += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"), reverse=True)
    # 3. the loader's search path
    lib = ctypes.util.find_library("nvrtc")
    if lib:
        found.append(lib)
    found += ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    # skip the builtins helper and the "alt" (static-libstdc++) twin, keep order, no repeats
    keep = [f for f in found if "builtins" not in os.path.basename(f) and ".alt." not in os.path.basename(f)]
    return list(dict.fromkeys(keep))


class Nvrtc:
    """A loaded libnvrtc."""

    def __init__(self, path: str | None = None):
        errors = []
        self.lib = None
        for candidate in [path] if path else _candidates():
            try:
                self.lib = ctypes.CDLL(candidate)
                self.path = candidate
                break
            except OSError as exc:
                errors.append(f"{candidate}: {exc}")
        if self.lib is None:
            raise NvrtcNotFound(
                "libnvrtc not found (pip install nvidia-cuda-nvrtc-cu12); tried: " + "; ".join(errors[:6])
            )
        lib = self.lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        lib.nvrtcCreateProgram.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        for name in ("nvrtcGetProgramLogSize", "nvrtcGetPTXSize", "nvrtcGetCUBINSize"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        for name in ("nvrtcGetProgramLog", "nvrtcGetPTX", "nvrtcGetCUBIN"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: {self.lib.nvrtcGetErrorString(status).decode()}")

    @property
    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def supported_archs(self) -> list[int]:
        lib = self.lib
        if not hasattr(lib, "nvrtcGetNumSupportedArchs"):
            return []
        n = ctypes.c_int()
        self._check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, source: str, arch: str, name: str = "kernel.cu", options: tuple[str, ...] = ()) -> CompiledModule:
        """Compile ``source`` for ``arch`` ("sm_90" -> cubin, "compute_90" -> PTX)."""
        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            opts = [f"--gpu-architecture={arch}", *options]
            arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
            status = lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace")
            if status != 0:
                raise NvrtcCompileError(
                    f"{name} does not compile for {arch}: {lib.nvrtcGetErrorString(status).decode()}", log
                )
            get_size, get = (
                (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX) if arch.startswith("compute_") else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            )
            self._check(get_size(prog, ctypes.byref(size)), "get image size")
            image = ctypes.create_string_buffer(size.value)
            self._check(get(prog, image), "get image")
            raw = image.raw
            return CompiledModule(arch, raw.rstrip(b"\0") if arch.startswith("compute_") else raw, log)
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@lru_cache(maxsize=1)
def load_nvrtc() -> Nvrtc:
    """The first loadable libnvrtc (raises :class:`NvrtcNotFound`)."""
    return Nvrtc()
