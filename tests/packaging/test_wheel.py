"""The built wheel, installed the way a user installs it: not editable, into a fresh virtual
environment, used from outside the source tree.

An editable install hides packaging mistakes (the source tree is on the path), so this builds
the wheel, checks it holds every module and data file of the tree, installs it with its
declared dependencies into a new venv, and runs ``--version``, ``methods`` and a tiny
``compress`` with a weight method and an activation method there. Marked ``packaging``: it
takes a few minutes (a venv and the dependencies from pip's cache), so ``make test-wheel``
runs it (``.ci/run`` calls that), not the default suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prune_cli.activation import ACTIVATION_METHODS
from prune_cli.methods import WEIGHT_METHODS

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
# source folder -> the package it installs as (setup.py's MAPPED, plus the main package)
INSTALLED_AS = {"prune_cli": "prune_cli", "gpu": "prune_cli/gpu", "calibrators": "prune_cli/calibrators"}
TORCH = "torch==2.13.0"
# every registered method, weight and activation (read from the source tree, checked in the wheel)
METHODS = [*WEIGHT_METHODS, *ACTIVATION_METHODS]  # the local CPU wheel; an unconstrained torch would pull a CUDA build


def _tree_files() -> set[str]:
    """Every file of the package sources, by the path it must have inside the wheel."""
    out = set()
    for folder, target in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT / folder)
            if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
                out.add(f"{target}/{rel.as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
                   check=True, cwd=out)
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel (and what it declares) installed; returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, str(wheel)], check=True)
    return venv / "bin"


def test_the_wheel_holds_every_module_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_tree_files() - names)
    assert not missing, f"not in {wheel.name}: {missing}"
    assert wheel.name.startswith("llm_prune_cli-")


def _run(bin_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{bin_dir}:{env.get('PATH', '')}")
    return subprocess.run([str(bin_dir / "prune-cli"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_wheel_runs_outside_the_source_tree(installed, tiny_llama_dir, tmp_path):
    where = subprocess.run([str(installed / "python"), "-c", "import prune_cli, prune_cli.gpu, prune_cli.calibrators;"
                            "print(prune_cli.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "site-packages" in where.stdout and str(ROOT) not in where.stdout

    version = _run(installed, ["--version"], tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("prune-cli ") and "llm-prune-cli" in version.stdout

    listed = _run(installed, ["methods"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    for name in METHODS:
        assert f"  {name} " in listed.stdout, name


@pytest.mark.parametrize("method", METHODS)
def test_the_installed_wheel_compresses_with_every_method(installed, tiny_llama_dir, tmp_path, method):
    out = tmp_path / method
    result = _run(installed, ["compress", str(tiny_llama_dir), "--method", method, "--sparsity", "0.5",
                              "--calib-samples", "2", "--seqlen", "16", "--eval-windows", "2", "--eval-seqlen", "16",
                              "--device", "cpu", "-o", str(out), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert method in (report["method"], (report.get("activation") or {}).get("method")), report
    assert report["ppl"]["compressed"] is not None
    assert (out / "model.safetensors").exists() and (out / "sparsity.json").exists()
