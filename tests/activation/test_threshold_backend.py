"""The backend reaches the TEAL / WINA threshold: quantile_threshold, fit, calibrate_activation
and the compress pipeline, on CPU.

A "model" backend stands in for the CuPy one: it has a device (the CPU) and computes
``activation_threshold`` with the NumPy model of threshold.cu (tests/gpu/kernel_model.py),
counting its calls, so these tests show both that the backend is used and that the thresholds
do not change. The CUDA kernels themselves: tests/gpu/test_cupy_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_cli.activation import build_activation_method
from prune_cli.activation.base import quantile_threshold
from prune_cli.gpu.torch_backend import TorchBackend
from tests.gpu import kernel_model as km
from tests.methods.helpers import correlated_inputs


class ThresholdModelBackend(TorchBackend):
    """The torch backend plus a device and ``activation_threshold`` from the radix-select model."""

    name = "model"
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def activation_threshold(self, x, scale, k):
        self.calls += 1
        assert 1 <= k <= x.numel()
        keys = km.threshold_keys(x.reshape(-1, x.shape[-1]).float().numpy(), None if scale is None else scale.numpy())
        return float(km.key_to_float(km.threshold_select(keys, k, blocks=3)))


def test_quantile_threshold_backends_agree():
    x = correlated_inputs(500, 64, seed=3)
    x[:, 5] = 0.0  # ties at zero
    scale = torch.rand(64) * 2
    model = ThresholdModelBackend()
    for s in (None, scale):
        for sparsity in (0.0, 1e-4, 0.25, 0.5, 0.93, 1.0):
            plain = quantile_threshold(x, sparsity, s)
            assert quantile_threshold(x, sparsity, s, TorchBackend()) == plain
            assert quantile_threshold(x, sparsity, s, model) == plain
            scores = x.abs() if s is None else x.abs() * s
            k = round(sparsity * x.numel())
            if k:
                assert plain == float(scores.reshape(-1).kthvalue(k).values)  # the definition
                assert int((scores <= plain).sum()) >= k > int((scores < plain).sum())
            else:
                assert plain == -1.0
    assert model.calls == 2 * 5  # every sparsity but 0 asked the backend


def test_quantile_threshold_skips_a_backend_on_another_device():
    model = ThresholdModelBackend()
    model.device = torch.device("meta")
    x = correlated_inputs(100, 16)
    assert quantile_threshold(x, 0.5, None, model) == quantile_threshold(x, 0.5)
    assert model.calls == 0


def _fits(method, lin, x, sparsity, backend):
    return method.fit(lin, x, sparsity, None, backend=backend).threshold


@pytest.mark.parametrize("name", ["teal", "wina"])
def test_fit_thresholds_with_a_backend(name):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, 3] = 0  # a dead column: scale 0
    x = correlated_inputs(1000, 64, seed=2)
    method = build_activation_method(name)
    model = ThresholdModelBackend()
    for sparsity in (0.1, 0.5, 0.8):
        assert _fits(method, lin, x, sparsity, model) == _fits(method, lin, x, sparsity, None)
    assert model.calls == 3


def test_calibrate_activation_passes_the_backend_to_every_fit():
    from prune_cli.stages.activation import activation_targets, calibrate_activation, uniform_allocation
    from tests.tiny_models import tiny_model

    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    records = []
    for backend in (None, ThresholdModelBackend()):
        model = tiny_model("llama").eval()
        targets = activation_targets(model, lambda name: True)
        records.append(calibrate_activation(
            model, targets, build_activation_method("wina"), uniform_allocation(targets, 0.5), windows, 2,
            torch.device("cpu"), 4096, 0, backend=backend,
        ))
    assert backend.calls == len(targets) > 0
    assert records[0] == records[1]


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_compress_hands_its_backend_to_the_activation_stage(monkeypatch, tiny_llama_dir, method):
    """compress() gives the resolved backend to the activation stage: with the model backend
    standing in for CuPy, every threshold comes from it and the report is unchanged."""
    from prune_cli.recipe.config import resolve
    from prune_cli.run import pipeline
    from prune_cli.run.pipeline import CompressRequest, compress

    overrides = {"method": method, "sparsity": 0.4, "device": "cpu", "calibration": {"samples": 2, "seqlen": 16},
                 "evaluation": {"enabled": False}}
    want = compress(CompressRequest(resolve(None, {**overrides, "backend": "torch"}), str(tiny_llama_dir), None))
    model_backend = ThresholdModelBackend()
    monkeypatch.setattr(pipeline, "resolve_backend", lambda name, device: (model_backend, None))  # compress() resolves it there
    got = compress(CompressRequest(resolve(None, overrides), str(tiny_llama_dir), None))
    layers = want["activation"]["layers"]
    assert model_backend.calls == len(layers) > 0
    assert [r["threshold"] for r in got["activation"]["layers"]] == [r["threshold"] for r in layers]
    assert got["backend"] == "model"
