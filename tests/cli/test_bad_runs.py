"""Faults of whole runs: damaged inputs found before they are trusted, finished work never lost,
every user error an exit code 2 with one line (never an internal error), output that cannot be
written said in one line.

Same pattern as tests/cli/test_bad_input.py (whose helpers this file uses): each case goes
through the real CLI and asserts the exit code, one error line naming the problem, and what is
left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from prune_cli.checkpoint.output import OWNER_FILE
from tests.cli.test_bad_input import FAST, fingerprint, one_line_error, run

ACTIVATION_FILE = "activation_sparsity.safetensors"
EVAL = ["--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]


# ----------------------------------------------------------------------------- 1. activation files with NaN


def _compressed(tmp_path_factory, model, method: str) -> Path:
    """A fresh checkpoint of ``model`` by ``method`` at 50% (no evaluation)."""
    out = tmp_path_factory.mktemp(method) / "out"
    result = run("compress", model, "--method", method, "--sparsity", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def teal_checkpoint(tmp_path_factory, tiny_llama_dir):
    """A fresh TEAL checkpoint (activation sparsity; no evaluation)."""
    return _compressed(tmp_path_factory, tiny_llama_dir, "teal")


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
    from prune_cli.core.errors import NonFiniteError
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


# ----------------------------------------------------------------------------- 2. --dry-run refuses what the run refuses


def _stopped_run(monkeypatch, tiny_llama_dir, out: Path, calib: Path) -> None:
    """A run to ``out`` stopped (as by Ctrl-C) after its first block: its resume state is kept."""
    from prune_cli.core import stopping
    from prune_cli.core.errors import InterruptedRun
    from prune_cli.streaming.driver import BlockDriver

    real = BlockDriver.block

    def block(self, index):
        stopping.request(InterruptedRun("SIGINT", 130))
        return real(self, index)

    with monkeypatch.context() as m:
        m.setattr(BlockDriver, "block", block)
        result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "--calib-text", calib,
                     "-o", out, "--checkpoint-interval", "0")
    assert result.exit_code == 130, result.output
    assert "resume state is kept" in result.stderr


def test_dry_run_with_resume_refuses_a_changed_calibration_file(tmp_path, tiny_llama_dir, monkeypatch):
    """The dry run makes the run's resume check: a calibration file changed since the
    interrupted run is refused by both, and an unchanged one passes both."""
    from prune_cli.calibrators.sources import bundled_text

    calib = tmp_path / "calib.txt"
    text = bundled_text("calibration").text[:20000]
    calib.write_text(text)
    out = tmp_path / "out"
    _stopped_run(monkeypatch, tiny_llama_dir, out, calib)
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "--calib-text", calib, "-o", out,
            "--resume"]
    same = run(*args, "--dry-run", "--json")
    assert same.exit_code == 0, same.output
    calib.write_text(text[::-1])
    before = fingerprint(tmp_path)
    one_line_error(run(*args, "--dry-run"), 2, "cannot resume")
    assert fingerprint(tmp_path) == before
    one_line_error(run(*args), 2, "cannot resume")
    kept = {k: v for k, v in fingerprint(tmp_path).items() if not k.endswith(OWNER_FILE)}  # the run marks it stopped again
    assert kept == {k: v for k, v in before.items() if not k.endswith(OWNER_FILE)}  # the resume state is kept


@pytest.mark.parametrize("case,needle", [
    ("calib-missing", "text file not found"),
    ("calib-binary", "binary file"),
    ("too-few-tokens", "calibration text has"),
    ("eval-missing", "text file not found"),
    ("device-cuda", "CUDA is not available"),
    pytest.param("unknown-task", "nosuchtask", marks=pytest.mark.slow),  # lm-eval's task index, twice
])
def test_dry_run_refuses_what_the_run_refuses(tmp_path, tiny_llama_dir, monkeypatch, case, needle):
    """Each of these inputs is refused by the run before its first block; the dry run refuses
    it too (it used to print the plan and exit 0)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = {
        "calib-missing": ["--calib-text", tmp_path / "nope.txt"],
        "calib-binary": ["--calib-text", "/bin/ls"],
        "too-few-tokens": ["--calib-samples", "100000", "--seqlen", "512"],
        "eval-missing": ["--eval-text", tmp_path / "nope.txt"],
        "device-cuda": ["--device", "cuda"],
        "unknown-task": ["--eval-tasks", "nosuchtask"],
    }[case]
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *extra, "-o", tmp_path / "out"]
    for dry in (["--dry-run"], []):
        one_line_error(run(*args, *dry), 2, needle)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 3. a sweep never loses finished points


SWEEP = ["--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu",
         "--no-baseline-cache"]


def _no_runs(monkeypatch):
    import prune_cli.run.sweep as sweep

    monkeypatch.setattr(sweep, "compress", lambda *a, **k: pytest.fail("a point ran before every point was checked"))


@pytest.mark.parametrize("case,needle", [("existing-folder", "wanda-0.6"), ("keep-is-a-file", "is not a folder"),
                                         ("pattern-does-not-fit", "3:7 does not divide")])
def test_sweep_checks_every_point_before_the_first_runs(tmp_path, tiny_llama_dir, monkeypatch, case, needle):
    """A point's checkpoint folder that exists, a --keep-checkpoints that is a file, a pattern
    that fits no layer: refused before any point runs (they were found after the points before
    them had run, and those were lost)."""
    keep = tmp_path / "keep"
    (keep / "wanda-0.6").mkdir(parents=True)
    (keep / "wanda-0.6" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    grid = {"existing-folder": ["--sparsities", "0.3,0.6", "--keep-checkpoints", keep],
            "keep-is-a-file": ["--sparsities", "0.3", "--keep-checkpoints", tmp_path / "file"],
            "pattern-does-not-fit": ["--sparsities", "0.3", "--patterns", "3:7"]}[case]
    _no_runs(monkeypatch)
    before = fingerprint(tmp_path)
    one_line_error(run("sweep", tiny_llama_dir, "--methods", "wanda", *grid, *SWEEP), 2, needle)
    assert fingerprint(tmp_path) == before


def _second_point_fails(monkeypatch, exc: BaseException) -> None:
    import prune_cli.run.sweep as sweep

    real, calls = sweep.compress, []

    def compress(request, events=None):
        calls.append(request)
        if len(calls) == 2:
            raise exc
        return real(request, events)

    monkeypatch.setattr(sweep, "compress", compress)


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("error,code,needle", [
    (OSError(5, "Input/output error"), 1, "Input/output error"),
    ("not-enough-text", 2, "calibration text is too short"),
    ("interrupt", 130, "interrupted by SIGINT"),
], ids=["internal", "bad-input", "ctrl-c"])
def test_a_failed_point_still_prints_the_finished_ones(tmp_path, tiny_llama_dir, monkeypatch, as_json, error, code, needle):
    """The second of three points fails: the first point's results are printed (table, or the
    one JSON object with the error and exit code in it), the error is said once on stderr, the
    first point's checkpoint stays."""
    from prune_cli.core.errors import InterruptedRun, NotEnoughTextError

    exc = {"not-enough-text": NotEnoughTextError("calibration text is too short"),
           "interrupt": InterruptedRun("SIGINT", 130)}.get(error, error)
    _second_point_fails(monkeypatch, exc)
    keep = tmp_path / "keep"
    result = run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "0.3,0.5,0.7", *SWEEP,
                 "--keep-checkpoints", keep, *(["--json"] if as_json else []))
    assert result.exit_code == code, result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith(("error:", "internal error:", "stopped:"))]
    assert len(errors) == 1 and needle in errors[0], result.stderr
    if as_json:
        report = json.loads(result.stdout)
        assert [r["target_sparsity"] for r in report["runs"]] == [0.3] and report["points_planned"] == 3
        assert report["exit_code"] == code and needle in report["error"]["message"]
    else:
        assert "wanda" in result.stdout and "0.3" in result.stdout and "stopped after 1 of 3 points" in result.stdout
    assert sorted(p.name for p in keep.iterdir()) == ["wanda-0.3"]
    assert json.loads((keep / "wanda-0.3" / "sparsity.json").read_text())["target_sparsity"] == 0.3


# ----------------------------------------------------------------------------- 4. internal errors that were user errors


@pytest.fixture(scope="module")
def wanda_checkpoint(tmp_path_factory, tiny_llama_dir):
    return _compressed(tmp_path_factory, tiny_llama_dir, "wanda")


@pytest.mark.report_edited
@pytest.mark.parametrize("edit,needle", [
    (lambda r: [1, 2], "is not a JSON object but a list"),
    (lambda r: {}, "is not a prune-cli sparsity report (format None)"),
    (lambda r: {**r, "format": "someone-else/report"}, "is not a prune-cli sparsity report"),
    (lambda r: {**r, "schema_version": 99}, "has schema_version 99; this prune-cli reads up to 1"),
    (lambda r: {**r, "layers": [{"name": 3}]}, "layers[0] is not a valid entry"),
    (lambda r: {**r, "files": {"model.safetensors": 1}}, "files is a dict, not a list"),
], ids=["list", "empty", "other-format", "newer-schema", "bad-layer", "files-as-dict"])
def test_verify_refuses_a_report_it_cannot_check(wanda_checkpoint, tmp_path, edit, needle):
    """A report that is not prune-cli's (a list crashed verify with exit 1; ``{}`` or another
    tool's report "verified" with nothing checked) is exit 2 naming the file."""
    target = tmp_path / "copy"
    shutil.copytree(wanda_checkpoint, target)
    report = json.loads((target / "sparsity.json").read_text())
    (target / "sparsity.json").write_text(json.dumps(edit(report)))
    data = one_line_error(run("verify", target, "--json"), 2, needle, as_json=True)
    assert "sparsity.json" in data["error"]["message"]


def _full_disk(monkeypatch, where: str) -> None:
    """The file system fills up at the first write of ``where``: the checkpoint's shards
    (``os.pwrite`` raises OSError ENOSPC) or the spilled calibration activations (safetensors'
    writer raises its own error carrying the OS error number)."""
    import errno

    from safetensors import SafetensorError

    if where == "shards":
        from prune_cli.checkpoint.shards import StreamingCheckpoint

        def write(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(StreamingCheckpoint, "write", write)
    else:
        from prune_cli.calibrators.spill import FileTensor

        def spill(cls, *a, **k):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(FileTensor, "write", classmethod(spill))


@pytest.mark.parametrize("where", ["shards", "spill"])
def test_a_full_disk_during_calibration_is_named(tmp_path, tiny_llama_dir, monkeypatch, where):
    """A disk that fills up while the blocks are written (or activations spilled) is exit 2
    naming the folder, not an internal error; the staging folder is removed."""
    _full_disk(monkeypatch, where)
    out = tmp_path / "out"
    spill = ["--max-memory", "1KB"] if where == "spill" else []
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, *spill, "-o", out, "--json")
    data = one_line_error(result, 2, f"no space left on {tmp_path}", as_json=True)
    assert data["error"]["type"] == "OutputNotWritableError"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("length,needle", [(300, "is 300 bytes, the file system allows"),
                                           (240, "prune-cli writes .NAME.partial-XXXXXXXX beside it")],
                         ids=["name-over-the-limit", "staging-name-over-the-limit"])
def test_an_output_name_too_long_is_said_so(tmp_path, tiny_llama_dir, monkeypatch, dry, length, needle):
    """An --output name the file system cannot hold (or whose staging folder it cannot) is exit
    2 saying the name is too long, run and dry run alike, before any work (it was an internal
    error, or a misleading 'cannot write in' the parent)."""
    import prune_cli.run.job as job

    monkeypatch.setattr(job, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = fingerprint(tmp_path)
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", tmp_path / ("o" * length),
                 *(["--dry-run"] if dry else []))
    one_line_error(result, 2, "--output name too long")
    assert needle in result.stderr
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("command", [["verify", "{p}"], ["eval", "{p}", *EVAL],
                                     ["compress", "{m}", "--method", "wanda", "--sparsity", "0.5", "--calib-text", "{p}",
                                      "--dry-run"]], ids=["verify", "eval", "calib-text"])
def test_an_input_path_with_a_name_too_long_is_exit_2(tmp_path, tiny_llama_dir, command):
    path = tmp_path / ("n" * 300)
    args = [a.format(p=path, m=tiny_llama_dir) for a in command]
    one_line_error(run(*args), 2, "file name too long")


# ----------------------------------------------------------------------------- 4. stdout that cannot take the results

ROOT = Path(__file__).resolve().parents[2]

# stdout on a full device, as /dev/full is: every write fails with ENOSPC until stdout is pointed
# elsewhere (prune-cli then points it at /dev/null). The real /dev/full when this machine has it.
FULL_STDOUT = """
import errno, io, os, sys
if not os.path.exists("/dev/full"):
    class Full(io.RawIOBase):
        def __init__(self):
            self.full = os.fstat(1).st_ino
        def writable(self):
            return True
        def fileno(self):
            return 1
        def write(self, data):
            if os.fstat(1).st_ino == self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(1, data)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(Full()), encoding="utf-8")
from prune_cli.cli import main
main()
"""


def _cli(args, stdout=subprocess.PIPE, code: str = "from prune_cli.cli import main; main()", **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, **kw)


def _one_stderr_error(err: str, needle: str) -> str:
    assert "Traceback" not in err and "internal error" not in err and "Exception ignored" not in err, err
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    return errors[0]


def test_stdout_on_a_full_device_keeps_the_checkpoint_and_says_where_its_report_is(tmp_path, tiny_llama_dir):
    """stdout on a full device after the checkpoint was written: the checkpoint stays, exit 2
    (not an internal error), one line saying the results could not be printed and where the
    report file is."""
    out = tmp_path / "out"
    stdout = open("/dev/full", "w") if Path("/dev/full").is_char_device() else subprocess.PIPE
    proc = _cli(["compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", out, "--json"],
                stdout=stdout, code=FULL_STDOUT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = _one_stderr_error(err, "could not print the results on stdout")
    assert "No space left on device" in line and str(out / "sparsity.json") in line
    assert json.loads((out / "sparsity.json").read_text())["method"] == "magnitude"


def test_a_closed_stdout_is_refused_before_anything_runs(tmp_path, wanda_checkpoint):
    """``prune-cli verify CKPT --json >&-``: exit 2 and one line, before any work (it was an
    internal error after the work; the table was lost without a word)."""
    for extra in (["--json"], []):
        proc = _cli(["verify", wanda_checkpoint, *extra], stdout=None, preexec_fn=lambda: os.close(1))
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        _one_stderr_error(err, "stdout is closed")


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_pipe_whose_reader_left_is_one_line(wanda_checkpoint, as_json):
    """``prune-cli verify CKPT | true``: exit 2 with one line (the table ended in rich's silent
    exit 1, --json in an internal error)."""
    proc = _cli(["verify", wanda_checkpoint, *(["--json"] if as_json else [])])
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 2, err
    _one_stderr_error(err, "its reader closed the pipe")


# ----------------------------------------------------------------------------- 5. smaller


@pytest.mark.parametrize("command", [
    ["compress", "{m}", "--method", "wanda", "--sparsity", "0.5", "-o", "{t}", "--dry-run"],
    ["eval", "{t}", "--device", "cpu"],
    ["verify", "{t}"],
    ["sweep", "{m}", "--methods", "wanda", "--sparsities", "1.5"],
], ids=["compress", "eval", "verify", "sweep"])
def test_debug_keeps_the_exit_code_and_adds_the_traceback(tmp_path, tiny_llama_dir, command):
    """--debug turned every exit 2 into exit 1 (the bare traceback); now the traceback comes
    first, then the same error line and exit code."""
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    args = [a.format(m=tiny_llama_dir, t=tmp_path) for a in command]
    plain = run(*args)
    assert plain.exit_code == 2, plain.output
    line = [l for l in plain.stderr.splitlines() if l.startswith("error:")]
    debug = run(*args, "--debug")
    assert debug.exit_code == 2, debug.output
    assert "Traceback (most recent call last)" in debug.stderr
    assert line and line[0] in debug.stderr.splitlines()


def test_task_scoring_outside_a_git_folder_prints_no_git_error(tmp_path, tiny_llama_dir):
    """lm-eval runs ``git describe`` for its results' git_hash; outside a git folder git's
    ``fatal: not a git repository`` reached our stderr (twice)."""
    proc = subprocess.run([sys.executable, "-c", "from prune_cli.cli import main; main()", "eval", str(tiny_llama_dir),
                           "--tasks", "prune_cloze", "--task-limit", "2", "--no-ppl", "--device", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                               "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert proc.returncode == 0, proc.stderr
    assert "fatal" not in proc.stderr and "git" not in proc.stderr, proc.stderr
    assert "prune_cloze" in proc.stdout and "acc_norm" in proc.stdout  # eval's task table had no rows


def test_a_narrow_terminal_keeps_every_number(tmp_path, tiny_llama_dir, monkeypatch):
    """At 20 columns rich cut every cell to '3…' (COLUMNS=20): the tables of compress, eval and
    sweep now fall back to plain 'column: value' lines that hold every number of the report."""
    from prune_cli import cli

    monkeypatch.setattr(cli.stdout, "_width", 20)  # as COLUMNS=20 sets it
    fmt = cli._fmt
    args = ["--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *args, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "sparsity.json").read_text())
    for value in (report["ppl"]["dense"], report["ppl"]["compressed"], report["sparsity"]):
        assert fmt(value) in result.stdout, result.stdout

    table, as_json = (run("eval", tmp_path / "o", *EVAL, *extra) for extra in ([], ["--json"]))
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    evaluated = json.loads(as_json.stdout)
    for value in (evaluated["ppl"], evaluated["sparsity"], evaluated["tokens"]):
        assert fmt(value) in table.stdout, table.stdout

    sweep = run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "0.5", *args, "--no-baseline-cache",
                "--keep-checkpoints", tmp_path / "keep")
    assert sweep.exit_code == 0, sweep.output
    point = json.loads((tmp_path / "keep" / "wanda-0.5" / "sparsity.json").read_text())
    for value in (point["ppl"]["dense"], point["ppl"]["compressed"], point["ppl"]["ratio"], point["sparsity"]):
        assert fmt(value) in sweep.stdout, sweep.stdout


@pytest.mark.parametrize("case,needle", [("under-a-file", "is not a folder"), ("a-folder", "is a folder")])
def test_a_plot_path_that_cannot_be_written_is_refused_before_the_sweep(tmp_path, tiny_llama_dir, monkeypatch, case, needle):
    """--plot under a file (or onto a folder) was an internal error after every point had run,
    and the sweep's results were lost."""
    pytest.importorskip("matplotlib")
    (tmp_path / "file").write_text("x")
    path = {"under-a-file": tmp_path / "file" / "sweep.png", "a-folder": tmp_path}[case]
    _no_runs(monkeypatch)
    one_line_error(run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "0.5", *SWEEP, "--plot", path), 2, needle)


def test_a_plot_that_fails_after_the_sweep_still_prints_its_results(tmp_path, tiny_llama_dir, monkeypatch):
    import errno

    import prune_cli.run.sweep as sweep

    def failing(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sweep, "plot", failing)
    monkeypatch.setattr(sweep, "check_plot_path", lambda path: None)
    result = run("sweep", tiny_llama_dir, "--methods", "wanda", "--sparsities", "0.5", *SWEEP, "--plot", tmp_path / "p.png",
                 "--json")
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    assert len(report["runs"]) == 1 and report["runs"][0]["ppl"] > 1 and "no space left" in report["error"]["message"]
