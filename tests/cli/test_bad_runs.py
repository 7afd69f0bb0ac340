"""Faults of whole runs: damaged inputs found before they are trusted, finished work never lost,
every user error an exit code 2 with one line (never an internal error), output that cannot be
written said in one line.

Same pattern as tests/cli/test_bad_input.py (whose helpers this file uses): each case goes
through the real CLI and asserts the exit code, one error line naming the problem, and what is
left on disk.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.cli.test_bad_input import FAST, fingerprint, one_line_error, run

ACTIVATION_FILE = "activation_sparsity.safetensors"
EVAL = ["--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]


# ----------------------------------------------------------------------------- 1. activation files with NaN


@pytest.fixture(scope="module")
def teal_checkpoint(tmp_path_factory, tiny_llama_dir):
    """A fresh TEAL checkpoint (activation sparsity; no evaluation)."""
    out = tmp_path_factory.mktemp("teal") / "out"
    result = run("compress", tiny_llama_dir, "--method", "teal", "--sparsity", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _set_float(path: Path, tensor: str, value: float) -> None:
    """Overwrite the first value of float32 ``tensor`` in safetensors file ``path`` in place (same
    size, same header: only the value changes, as a flipped bit or a careless edit would)."""
    with path.open("r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(size))[tensor]
        assert entry["dtype"] == "F32", entry
        handle.seek(8 + size + entry["data_offsets"][0])
        handle.write(struct.pack("<f", value))


def _damaged_copy(teal_checkpoint: Path, tmp_path: Path, tensor: str, value: float) -> Path:
    target = tmp_path / "damaged"
    shutil.copytree(teal_checkpoint, target)
    _set_float(target / ACTIVATION_FILE, tensor, value)
    return target


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.down_proj.threshold", float("nan")),
                                          ("model.layers.0.self_attn.q_proj.channel_scale", float("inf"))],
                         ids=["nan-threshold", "inf-scale"])
def test_eval_and_verify_refuse_a_non_finite_activation_buffer(teal_checkpoint, tmp_path, tensor, value):
    """eval (which used to report a perplexity), verify (which used to say ok) and the runtime
    loader each refuse the file, naming it and the buffer."""
    from prune_cli.errors import NonFiniteError
    from prune_cli.runtime import load

    target = _damaged_copy(teal_checkpoint, tmp_path, tensor, value)
    before = fingerprint(tmp_path)
    data = one_line_error(run("eval", target, *EVAL, "--json"), 2, tensor, as_json=True)
    assert data["error"]["type"] == "NonFiniteError" and ACTIVATION_FILE in data["error"]["message"]
    one_line_error(run("verify", target), 2, f"{ACTIVATION_FILE}, buffer {tensor}")
    with pytest.raises(NonFiniteError, match=tensor):
        load(target)
    assert fingerprint(tmp_path) == before


def test_an_activation_file_without_a_threshold_is_named(teal_checkpoint, tmp_path):
    """An entry missing from the activation file is one line naming it, not a KeyError."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "partial"
    shutil.copytree(teal_checkpoint, target)
    tensors = load_file(str(target / ACTIVATION_FILE))
    tensors.pop("model.layers.0.mlp.up_proj.threshold")
    save_file(tensors, str(target / ACTIVATION_FILE))
    one_line_error(run("eval", target, *EVAL), 2, "no model.layers.0.mlp.up_proj.threshold")
