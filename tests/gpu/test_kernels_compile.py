"""Every CUDA kernel compiles, with NVRTC alone: no GPU, no driver, no CuPy (runs in CI).

For each module (common.cu + <module>.cu) and each target:
* ``compute_80`` / ``compute_90`` -> PTX, which must define exactly the kernels that
  ``prune_cli.gpu.kernel_source.KERNELS`` lists (what the CuPy backend looks up by name);
* ``sm_80`` / ``sm_90`` -> cubin through NVRTC's built-in ptxas (register allocation, shared
  memory limits), with no local-memory spills.
Compiled with the flags CuPy adds itself (``-ftz=true``). Skips only when libnvrtc is absent.
"""

from __future__ import annotations

import re

import pytest

from prune_cli.gpu import nvrtc
from prune_cli.gpu.kernel_source import KERNELS, module_source

ARCHS = ("80", "90")


@pytest.fixture(scope="module")
def compiler() -> nvrtc.Nvrtc:
    try:
        return nvrtc.load_nvrtc()
    except nvrtc.NvrtcNotFound as exc:
        pytest.skip(f"NVRTC library not installed: {exc}")


def test_nvrtc_supports_the_targets(compiler):
    archs = compiler.supported_archs()
    if archs:  # NVRTC >= 11.2 reports them
        for arch in ARCHS:
            assert int(arch) in archs, f"NVRTC {compiler.version} cannot target sm_{arch}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(KERNELS))
def test_module_compiles_to_ptx_with_all_kernels(compiler, module, arch):
    compiled = compiler.compile(module_source(module), f"compute_{arch}", f"{module}.cu", nvrtc.CUPY_LIKE_OPTIONS)
    entries = compiled.entries()
    assert sorted(entries) == sorted(KERNELS[module])
    ptx = compiled.image.decode()
    if module in ("select", "threshold"):
        # mask-deciding multiplies must not flush subnormals, whatever -ftz says
        assert "mul.rn.f32" in ptx and "mul.rn.ftz.f32" not in ptx
    if module == "dsnot":
        # bit-identical to torch's separate fp32 ops: explicit .rn, no flush to zero, no fusion
        assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "sub.rn.f32" in ptx
        assert ".ftz" not in ptx and "fma" not in ptx and "mad." not in ptx


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(KERNELS))
def test_module_compiles_to_cubin_without_spills(compiler, module, arch):
    compiled = compiler.compile(
        module_source(module), f"sm_{arch}", f"{module}.cu", (*nvrtc.CUPY_LIKE_OPTIONS, "-Xptxas=-v")
    )
    assert compiled.image[:4] == b"\x7fELF"
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", compiled.log)]
    assert spills and max(spills) == 0, compiled.log
    assert "warning" not in compiled.log.lower(), compiled.log


def test_compile_error_is_reported(compiler):
    with pytest.raises(nvrtc.NvrtcCompileError) as info:
        compiler.compile('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }', "compute_80")
    assert "undefined_name" in info.value.log
