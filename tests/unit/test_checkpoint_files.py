"""Damaged checkpoint folders are bad input (exit 2, one line naming the file), never an
internal error and never a silently dense evaluation."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from prune_cli.checkpoint.files import check_checkpoint_folder, check_safetensors, check_weight_files
from prune_cli.cli import app
from prune_cli.core.errors import CheckpointError
from tests.cli.test_cli import SMALL, assert_one_line_error
from tests.tiny_models import save_tiny_model, tiny_model

runner = CliRunner()
EVAL_SMALL = ["--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def truncate(path: Path, keep: int | None = None) -> tuple[int, int]:
    """Keep the first ``keep`` bytes (default: half) of ``path``; returns (kept, original)."""
    data = path.read_bytes()
    keep = len(data) // 2 if keep is None else keep
    path.write_bytes(data[:keep])
    return keep, len(data)


def raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A hand-made safetensors file: 8-byte length, header bytes, data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


@pytest.fixture()
def tiny_folder(tmp_path):
    return save_tiny_model("llama", tmp_path / "tiny")


@pytest.fixture(scope="module")
def teal_checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("teal")
    tiny = save_tiny_model("llama", base / "tiny")
    out = base / "out"
    result = run("compress", tiny, "--method", "teal", "--sparsity", "0.5", *SMALL, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "activation_sparsity.safetensors").is_file()
    assert json.loads((out / "sparsity.json").read_text())["activation"]
    return out


@pytest.fixture()
def teal_copy(tmp_path, teal_checkpoint):
    return Path(shutil.copytree(teal_checkpoint, tmp_path / "teal"))


# ----------------------------------------------------------------------------- check_safetensors


def test_good_file_passes(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.int64)}, str(path))
    header = check_safetensors(path)
    assert set(header) >= {"a", "b"}


def test_empty_tensor_file_passes(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    check_safetensors(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(path))
    kept, size = truncate(path)
    with pytest.raises(CheckpointError) as info:
        check_safetensors(path)
    assert "t.safetensors" in str(info.value) and "truncated" in str(info.value)
    assert f"{kept:,} of {size:,} bytes" in str(info.value)


def test_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=r"short\.safetensors is truncated: 3 of at least 8 bytes"):
        check_safetensors(path)


def test_empty_file(tmp_path):
    path = tmp_path / "zero.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"zero\.safetensors is empty"):
        check_safetensors(path)


def test_header_length_larger_than_file(tmp_path):
    path = raw_safetensors(tmp_path / "h.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, length=500)
    with pytest.raises(CheckpointError, match=r"h\.safetensors is truncated: \d+ of at least 508 bytes"):
        check_safetensors(path)


def test_absurd_header_length_is_corrupt(tmp_path):
    path = raw_safetensors(tmp_path / "h.safetensors", b"{}", length=2**62)
    with pytest.raises(CheckpointError, match=r"h\.safetensors has a corrupt header"):
        check_safetensors(path)


@pytest.mark.parametrize("header", [b"not json at all", b"[1, 2, 3]", b"\xff\xfe{}", b'{"a": 3}'])
def test_header_not_json_or_wrong_shape(tmp_path, header):
    path = raw_safetensors(tmp_path / "h.safetensors", header)
    with pytest.raises(CheckpointError, match=r"h\.safetensors has a corrupt header"):
        check_safetensors(path)


def test_offsets_beyond_the_data(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    path = raw_safetensors(tmp_path / "o.safetensors", header, data=b"\0" * 16)
    size = path.stat().st_size
    with pytest.raises(CheckpointError, match=rf"o\.safetensors is truncated: {size} of {size + 16} bytes"):
        check_safetensors(path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]},  # end before begin
        {"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]},  # negative
        {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},  # 12 bytes for 4 floats
        {"dtype": "F32", "shape": [4]},  # no offsets
    ],
)
def test_bad_offsets_are_corrupt(tmp_path, entry):
    path = raw_safetensors(tmp_path / "b.safetensors", {"a": entry}, data=b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"b\.safetensors has a corrupt header"):
        check_safetensors(path)


def test_trailing_bytes(tmp_path):
    path = raw_safetensors(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, data=b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"x\.safetensors .*8 bytes"):
        check_safetensors(path)


# ----------------------------------------------------------------------------- folders


def test_good_folder_passes(tiny_folder):
    check_weight_files(tiny_folder)
    check_checkpoint_folder(tiny_folder)


def test_truncated_weights_in_folder(tiny_folder):
    truncate(tiny_folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        check_checkpoint_folder(tiny_folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    check_weight_files(folder)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json names {shards[-1].name}.*missing"):
        check_weight_files(folder)


def test_broken_link_is_missing(tiny_folder):
    (tiny_folder / "extra.safetensors").symlink_to(tiny_folder / "nowhere.safetensors")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors is missing"):
        check_weight_files(tiny_folder)


def test_index_not_json(tiny_folder):
    (tiny_folder / "model.safetensors.index.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        check_weight_files(tiny_folder)


def test_report_not_json(tiny_folder):
    (tiny_folder / "sparsity.json").write_text('{"format": "prune-cli/sparsity-report", ')
    with pytest.raises(CheckpointError, match=r"sparsity\.json .*not valid JSON"):
        check_checkpoint_folder(tiny_folder)


@pytest.mark.report_edited  # a hand-written partial report
def test_report_declares_missing_activation_file(tiny_folder):
    report = {"format": "prune-cli/sparsity-report", "activation": {"method": "teal"}}
    (tiny_folder / "sparsity.json").write_text(json.dumps(report))
    with pytest.raises(CheckpointError, match=r"activation_sparsity\.safetensors.*missing"):
        check_checkpoint_folder(tiny_folder)
    with pytest.raises(CheckpointError, match=r"activation_sparsity\.safetensors.*missing"):
        check_checkpoint_folder(tiny_folder, report)
    check_checkpoint_folder(tiny_folder, {"format": "prune-cli/sparsity-report", "activation": None})


# ----------------------------------------------------------------------------- through the CLI


def test_eval_truncated_checkpoint_exit_2(tiny_folder):
    kept, size = truncate(tiny_folder / "model.safetensors")
    result = run("eval", tiny_folder, *EVAL_SMALL)
    assert_one_line_error(result)
    assert "model.safetensors is truncated" in result.stderr and f"{kept:,} of {size:,} bytes" in result.stderr


def test_compress_truncated_checkpoint_exit_2(tmp_path, tiny_folder):
    truncate(tiny_folder / "model.safetensors")
    result = run("compress", tiny_folder, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "out")
    assert_one_line_error(result)
    assert "model.safetensors is truncated" in result.stderr
    assert not (tmp_path / "out").exists()


def test_compress_corrupt_header_exit_2(tmp_path, tiny_folder):
    path = tiny_folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\0\0\0\0"  # the header's first bytes: no longer JSON
    path.write_bytes(bytes(data))
    result = run("compress", tiny_folder, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "out")
    assert_one_line_error(result)
    assert "model.safetensors has a corrupt header" in result.stderr


def test_eval_activation_checkpoint_passes(teal_copy):
    result = run("eval", teal_copy, *EVAL_SMALL, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["activation_sparsity"] is not None


def test_eval_missing_activation_file_exit_2(teal_copy):
    (teal_copy / "activation_sparsity.safetensors").unlink()
    result = run("eval", teal_copy, *EVAL_SMALL)
    assert_one_line_error(result)
    assert "activation_sparsity.safetensors" in result.stderr and "missing" in result.stderr


def test_eval_truncated_activation_file_exit_2(teal_copy):
    truncate(teal_copy / "activation_sparsity.safetensors")
    result = run("eval", teal_copy, *EVAL_SMALL)
    assert_one_line_error(result)
    assert "activation_sparsity.safetensors is truncated" in result.stderr


def test_eval_report_not_json_exit_2(teal_copy):
    (teal_copy / "sparsity.json").write_text("{")
    result = run("eval", teal_copy, *EVAL_SMALL)
    assert_one_line_error(result)
    assert "sparsity.json" in result.stderr and "not valid JSON" in result.stderr


def test_file_names_agree_with_the_runtime():
    from prune_cli import runtime
    from prune_cli.checkpoint import files as checkpoint_files

    assert checkpoint_files.ACTIVATION_FILE == runtime.ACTIVATION_FILE
    assert checkpoint_files.REPORT_FILE == runtime.REPORT_FILE


# ----------------------------------------------------------------------------- file_digest


def _big_file(path: Path, size: int = 3 << 20) -> Path:
    path.write_bytes(bytes(range(256)) * (size // 256))
    return path


def _edit_middle_keep_mtime(path: Path) -> None:
    import os
    import time

    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, as any real edit is
    with path.open("r+b") as handle:
        handle.seek(before.st_size // 2)
        handle.write(b"\xff\xfe")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("full_hash", [True, False])
def test_file_digest_changes_on_a_same_size_edit_in_the_middle(tmp_path, monkeypatch, full_hash):
    from prune_cli.checkpoint import files as checkpoint_files

    if not full_hash:  # a file beyond the whole-content limit: its identity (ctime) gives it away
        monkeypatch.setattr(checkpoint_files, "FULL_HASH_BYTES", 0)
    path = _big_file(tmp_path / "w.safetensors")
    old = checkpoint_files.file_digest(path)
    assert checkpoint_files.file_digest(path) == old
    _edit_middle_keep_mtime(path)
    assert checkpoint_files.file_digest(path) != old


def test_file_digest_changes_when_the_file_is_replaced_by_another(tmp_path, monkeypatch):
    import os

    from prune_cli.checkpoint import files as checkpoint_files

    monkeypatch.setattr(checkpoint_files, "FULL_HASH_BYTES", 0)
    path = _big_file(tmp_path / "w.safetensors")
    old = checkpoint_files.file_digest(path)
    info = path.stat()
    other = tmp_path / "new.safetensors"
    other.write_bytes(path.read_bytes()[::-1])
    os.utime(other, ns=(info.st_atime_ns, info.st_mtime_ns))
    other.replace(path)  # same name, size and mtime: another inode
    assert checkpoint_files.file_digest(path) != old


def test_the_gguf_cache_folder_changes_when_the_gguf_file_changes_in_the_middle(tmp_path):
    from prune_cli.checkpoint import gguf_cache

    gguf = _big_file(tmp_path / "model.gguf")
    old = gguf_cache.folder_for(gguf)
    _edit_middle_keep_mtime(gguf)
    assert gguf_cache.folder_for(gguf) != old


def test_file_digest_of_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    from prune_cli.checkpoint.files import file_digest

    os.mkfifo(tmp_path / "model.safetensors")
    with within_seconds(10), pytest.raises(CheckpointError, match=r"model\.safetensors is a named pipe \(FIFO\)"):
        file_digest(tmp_path / "model.safetensors")


@contextlib.contextmanager
def within_seconds(seconds: int):
    """Fail (instead of hanging the test run) when the body blocks longer than ``seconds``."""
    import signal

    def timeout(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
