"""resolve_backend: choices, messages, loud failures, and import hygiene (no GPU needed)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import prune_cli.gpu
from prune_cli.core.errors import BackendUnavailableError, BadInputError, UnknownNameError
from prune_cli.gpu import backend as backend_mod
from prune_cli.gpu.backend import CupyUnavailable, resolve_backend
from prune_cli.gpu.torch_backend import TorchBackend


@pytest.fixture
def no_cupy(monkeypatch):
    """CuPy absent: importing it raises ImportError, whatever is installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    _forget_cupy_backend(monkeypatch)


def _forget_cupy_backend(monkeypatch):
    monkeypatch.delitem(sys.modules, "prune_cli.gpu.cupy_backend", raising=False)
    if hasattr(prune_cli.gpu, "cupy_backend"):
        monkeypatch.delattr(prune_cli.gpu, "cupy_backend")


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in ``cupy`` module, so the real CupyBackend start-up code runs on a CPU machine.
    Tests configure its failure; the imported cupy_backend module is dropped afterwards."""
    _forget_cupy_backend(monkeypatch)
    fake = types.ModuleType("cupy")
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        deviceGetAttribute=lambda attr, dev: 132 if attr == 16 else 232448,
        cudaDevAttrMultiProcessorCount=16,
        cudaDevAttrMaxSharedMemoryPerBlockOptin=97,
    )

    class Device:
        def __init__(self, index=0):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    yield fake
    sys.modules.pop("prune_cli.gpu.cupy_backend", None)
    if hasattr(prune_cli.gpu, "cupy_backend"):
        delattr(prune_cli.gpu, "cupy_backend")


def test_torch_is_torch_everywhere():
    for device in ("cpu", "cuda", "cuda:1", None):
        backend, message = resolve_backend("torch", device)
        assert isinstance(backend, TorchBackend) and message is None


def test_auto_on_cpu_is_torch_with_one_info_line():
    backend, message = resolve_backend("auto", "cpu")
    assert backend.name == "torch"
    assert message and "\n" not in message and "cpu" in message
    assert resolve_backend(None, "cpu")[0].name == "torch"


def test_explicit_cupy_on_cpu_fails_loudly():
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("cupy", "cpu")
    err = info.value
    assert isinstance(err, BadInputError) and err.exit_code == 2
    assert "\n" not in str(err) and "CUDA" in str(err) and err.hint


def test_unknown_backend_name_says_did_you_mean():
    with pytest.raises(UnknownNameError) as info:
        resolve_backend("cuppy", "cpu")
    assert info.value.exit_code == 2 and "cupy" in info.value.hint


def test_auto_on_cuda_without_cupy_falls_back_with_reason(no_cupy):
    backend, message = resolve_backend("auto", "cuda")
    assert backend.name == "torch"
    assert "CuPy is not installed" in message and "\n" not in message


def test_explicit_cupy_without_cupy_is_an_error_with_install_hint(no_cupy):
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("cupy", "cuda:0")
    assert "CuPy is not installed" in str(info.value)
    assert "pip install" in info.value.hint and "[gpu" in info.value.hint


def test_install_hint_matches_torchs_cuda():
    from prune_cli.gpu.backend import gpu_extra_hint

    assert "[gpu-cuda13]" in gpu_extra_hint("13.0") and "cupy-cuda13x" in gpu_extra_hint("13.0")
    assert "'prune-cli[gpu]'" in gpu_extra_hint("12.8") and "cupy-cuda12x" in gpu_extra_hint("12.8")
    assert "'prune-cli[gpu]'" in gpu_extra_hint("")  # a CPU torch: the CUDA 12 default


def test_kernel_compile_failure_auto_falls_back_explicit_fails(monkeypatch):
    def broken(device):
        raise CupyUnavailable("the CUDA kernels did not compile: select.cu(10): error", hint="use --backend torch")

    monkeypatch.setattr(backend_mod, "_load_cupy_backend", broken)
    backend, message = resolve_backend("auto", "cuda")
    assert backend.name == "torch" and "did not compile" in message
    with pytest.raises(BackendUnavailableError, match="did not compile"):
        resolve_backend("cupy", "cuda")


def test_cupy_backend_start_up_without_a_driver(fake_cupy):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient\nmore")

    fake_cupy.cuda.runtime.getDeviceCount = no_driver
    backend, message = resolve_backend("auto", "cuda")
    assert backend.name == "torch" and "cannot use the GPU" in message and "InsufficientDriver" in message
    with pytest.raises(BackendUnavailableError, match="cannot use the GPU"):
        resolve_backend("cupy", "cuda")


def test_cupy_backend_start_up_with_a_device_it_cannot_see(fake_cupy):
    with pytest.raises(BackendUnavailableError, match="not cuda:3"):
        resolve_backend("cupy", "cuda:3")


def test_cupy_backend_start_up_with_a_compile_error(fake_cupy):
    class CompileException(Exception):
        pass

    class RawModule:
        def __init__(self, code):
            assert 'extern "C" __global__' in code  # it is handed the real kernel source

        def compile(self):
            raise CompileException("select.cu(42): error: identifier \"x\" is undefined\nsecond line")

    fake_cupy.RawModule = RawModule
    with pytest.raises(BackendUnavailableError) as info:
        resolve_backend("cupy", "cuda")
    assert "the CUDA kernels did not compile" in str(info.value) and "\n" not in str(info.value)
    assert "--backend torch" in info.value.hint
    backend, message = resolve_backend("auto", "cuda")
    assert backend.name == "torch" and "did not compile" in message


def test_cupy_backend_start_up_without_nvrtc(fake_cupy):
    class RawModule:
        def __init__(self, code):
            pass

        def compile(self):
            raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: cannot open shared object file")

    fake_cupy.RawModule = RawModule
    with pytest.raises(BackendUnavailableError, match="did not load") as info:
        resolve_backend("cupy", "cuda")
    assert "libnvrtc" in str(info.value) and "nvidia-cuda-nvrtc-cu12" in info.value.hint


def test_resolving_torch_or_auto_on_cpu_never_imports_cupy():
    code = (
        "import sys\n"
        "import prune_cli.gpu.backend as b\n"
        "from prune_cli.gpu import torch_backend, launch, kernel_source, nvrtc\n"
        "assert b.resolve_backend('torch', 'cpu')[0].name == 'torch'\n"
        "assert b.resolve_backend('auto', 'cpu')[0].name == 'torch'\n"
        "try:\n"
        "    b.resolve_backend('cupy', 'cpu')\n"
        "except Exception as exc:\n"
        "    assert type(exc).__name__ == 'BackendUnavailableError'\n"
        "bad = sorted(m for m in sys.modules if m == 'cupy' or m.startswith(('cupy.', 'cupy_backends', 'prune_cli.gpu.cupy_backend')))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
