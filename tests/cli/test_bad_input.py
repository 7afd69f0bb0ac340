"""The bad-input and fault matrix: every case a user met and could not see coming.

Each case goes through the real CLI (``typer.testing.CliRunner`` on the app, or the ``main``
entry point in a subprocess where signals are involved) and asserts: the exit code, that the
message is one line naming the problem, that stdout is one valid JSON object under ``--json``,
and that nothing outside the run's own staging folder changed on disk (a fingerprint of the
folder around ``--output`` before and after).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prune_cli.checkpoint.lock import OutputLock, Owner
from prune_cli.checkpoint.output import OWNER_FILE
from prune_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--calib-samples", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--device", "cpu"]
FAST = ["--calib-samples", "2", "--seqlen", "16", "--no-eval", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fingerprint(folder: Path) -> dict:
    """Every path under ``folder`` with its kind, size, mtime and mode."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def one_line_error(result, code: int, needle: str, as_json: bool = False) -> dict | None:
    """The run failed with ``code``, one error line (plus at most a hint) naming ``needle``;
    under ``--json`` stdout is exactly one JSON error object, returned."""
    assert result.exit_code == code, result.output
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    errors = [i for i, l in enumerate(lines) if l.startswith(("error:", "internal error:", "stopped:"))]
    assert len(errors) == 1, result.stderr
    assert lines[errors[0] + 1 :] == [] or (len(lines) == errors[0] + 2 and lines[-1].startswith("hint:")), result.stderr
    assert needle in lines[errors[0]], lines[errors[0]]
    if not as_json:
        assert result.stdout == ""
        return None
    data = json.loads(result.stdout)
    assert data["exit_code"] == code and set(data["error"]) == {"type", "message", "hint"}
    assert needle in data["error"]["message"]
    return data


@pytest.fixture()
def checkpoint(tmp_path_factory, tiny_llama_dir):
    """A fresh prune-cli checkpoint (magnitude 50%, no evaluation)."""
    out = tmp_path_factory.mktemp("ckpt") / "out"
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- 1. never delete what is not ours


def test_empty_output_is_a_usage_error(tmp_path, tiny_llama_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = fingerprint(tmp_path)
    for extra in ([], ["--json"]):
        result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "--output", "", "--overwrite", *extra)
        one_line_error(result, 2, "--output", as_json=bool(extra))
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("where", ["cwd", "cwd-parent", "home", "root", "source-tree", "checkpoint-plus-foreign-file",
                                   "checkpoint-with-edited-card"])
def test_overwrite_refuses_folders_prune_cli_did_not_write(tmp_path, tiny_llama_dir, monkeypatch, checkpoint, where):
    work = tmp_path / "work"
    (work / "src" / ".git").mkdir(parents=True)
    (work / "src" / "setup.py").write_text("print('hi')\n")
    (work / "src" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    monkeypatch.chdir(work / "src")
    monkeypatch.setenv("HOME", str(work))
    target = {
        "cwd": ".",
        "cwd-parent": "..",
        "home": "~",
        "root": "/",
        "source-tree": str(work / "src"),
        "checkpoint-plus-foreign-file": str(checkpoint),
        "checkpoint-with-edited-card": str(checkpoint),
    }[where]
    if where == "checkpoint-plus-foreign-file":
        (checkpoint / "notes.md").write_text("my notes\n")
        watched = checkpoint.parent
    elif where == "checkpoint-with-edited-card":  # the model card prune-cli wrote, edited by hand
        with (checkpoint / "README.md").open("a") as card:
            card.write("\nEvaluated by hand on our data: see the wiki.\n")
        watched = checkpoint.parent
    else:
        watched = tmp_path
    before = fingerprint(watched)
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", target, "--overwrite", "--json")
    data = one_line_error(result, 2, "refusing to replace", as_json=True)
    assert data["error"]["type"] == "OutputExistsError"
    assert fingerprint(watched) == before


def test_overwrite_replaces_its_own_checkpoint(tiny_llama_dir, checkpoint):
    old = json.loads((checkpoint / "sparsity.json").read_text())
    assert {f["name"] for f in old["files"]} >= {"model.safetensors", "config.json"}
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((checkpoint / "sparsity.json").read_text())["method"] == "wanda"
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- 4./5. every method x --no-eval x --json


METHODS = {
    "magnitude": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-2:4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "dsnot": ["--method", "dsnot", "--base", "wanda", "--sparsity", "0.5"],
    "owl": ["--method", "wanda", "--sparsity", "0.5", "--layerwise", "owl", "--owl-m", "5", "--owl-lambda", "0.05"],
    "teal": ["--method", "teal", "--sparsity", "0.5"],
    "wina": ["--method", "wina", "--sparsity", "0.5"],
    "rsparse": ["--method", "rsparse", "--sparsity", "0.5"],
}


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("no_eval", [False, True], ids=["eval", "no-eval"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_with_and_without_eval_and_json(tmp_path, tiny_llama_dir, method, no_eval, as_json):
    args = ["--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]
    args += ["--no-eval"] if no_eval else []
    args += ["--json"] if as_json else []
    result = run("compress", tiny_llama_dir, *METHODS[method], *args, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "sparsity.json").is_file()
    if as_json:
        report = json.loads(result.stdout)
        assert (report["ppl"]["compressed"] is None) == no_eval
    else:
        assert "perplexity" in result.stdout and "internal error" not in result.stderr


def test_non_finite_numbers_are_null_and_flagged():
    from prune_cli.core.records import json_ready

    data = json_ready({"ppl": {"dense": 12.5, "compressed": float("inf")}, "layers": [{"x": float("nan")}]})
    text = json.dumps(data, allow_nan=False)  # strict JSON
    assert json.loads(text)["ppl"] == {"dense": 12.5, "compressed": None}
    assert data["non_finite"] == {"ppl.compressed": "inf", "layers[0].x": "nan"}


def test_diverged_perplexity_is_null_in_json(tmp_path, tiny_llama_dir, monkeypatch):
    """A compressed model whose perplexity overflows is reported, in strict JSON, as null with
    a flag, in --json and sparsity.json alike."""
    from prune_cli.stages.evaluate import EvalStage, Perplexity

    real = EvalStage.finish
    calls = []

    def diverging(self, driver):  # the second evaluation (the compressed model's) diverges
        calls.append(1)
        real(self, driver)
        if len(calls) == 2:
            self.result = Perplexity(float("inf"), 800.0, 15)

    monkeypatch.setattr(EvalStage, "finish", diverging)
    args = ["--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *args, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
    for report in (json.loads(result.stdout), json.loads((tmp_path / "o" / "sparsity.json").read_text())):
        assert report["ppl"]["compressed"] is None and report["ppl"]["ratio"] is None
        assert report["non_finite"]["ppl.compressed"] == "inf"


# ----------------------------------------------------------------------------- 6. leftovers of dead runs


def _dead_owner() -> Owner:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    me = Owner.current()
    return Owner(child.pid, me.host, me.boot_id, 1, "2026-01-01 00:00:00")


def test_leftovers_of_dead_runs_are_removed_and_said(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    dead = _dead_owner()
    for name in (".out.partial-abc123", ".out.old-def456"):
        (tmp_path / name / "old" if "old" in name else tmp_path / name).mkdir(parents=True)
        (tmp_path / name / OWNER_FILE).write_text(dead.to_json())
    (tmp_path / ".out.partial-abc123" / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / ".out.old-def456" / "old" / "sparsity.json").write_text('{"format": "prune-cli/sparsity-report"}')
    (tmp_path / ".out.partial-legacy").mkdir()  # an older prune-cli's, with no owner record
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"PID {dead.pid}" in result.stderr and ".out.partial-abc123" in result.stderr
    assert "restored the previous checkpoint" in result.stderr  # the killed swap is undone first...
    assert json.loads((out / "sparsity.json").read_text())["method"] == "magnitude"  # ...then replaced
    assert "no owner record" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-legacy", "out"]


def test_leftovers_of_live_runs_are_left_alone(tmp_path, tiny_llama_dir):
    (tmp_path / ".out.partial-live").mkdir()
    (tmp_path / ".out.partial-live" / OWNER_FILE).write_text(Owner.current().to_json())  # this process: alive
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "live run" in result.stderr and (tmp_path / ".out.partial-live").is_dir()


# ----------------------------------------------------------------------------- 8. two runs, one output


def test_second_run_to_a_locked_output_fails_fast_naming_the_holder(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    lock = OutputLock(out).acquire()  # as a concurrent run would hold it
    try:
        before = fingerprint(tmp_path)
        started = time.perf_counter()
        for extra in ([], ["--dry-run"]):
            result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", out, *extra, "--json")
            data = one_line_error(result, 2, f"PID {os.getpid()}", as_json=True)
            assert data["error"]["type"] == "OutputLockedError"
        assert time.perf_counter() - started < 30  # before loading the model or calibrating
        assert fingerprint(tmp_path) == before
    finally:
        lock.release()
    assert list(tmp_path.iterdir()) == []


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, tiny_llama_dir):
    (tmp_path / ".out.prune-cli.lock").write_text(_dead_owner().to_json())
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- 9./14. unwritable or existing output, found at start


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(
    "case,needle",
    [("proc", "cannot write in /proc"), ("under-a-file", "is not a folder"), ("exists", "output exists"),
     ("not-ours", "refusing to replace")],
)
def test_output_problems_are_found_before_any_work(tmp_path, tiny_llama_dir, monkeypatch, case, needle, dry):
    import prune_cli.run.job as job

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(job, "open_model", no_loading)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "data.csv").write_text("1,2\n")
    output, extra = {
        "proc": ("/proc/prune-cli-test/out", []),
        "under-a-file": (str(tmp_path / "file" / "out"), []),
        "exists": (str(tmp_path / "folder"), []),
        "not-ours": (str(tmp_path / "folder"), ["--overwrite"]),
    }[case]
    before = fingerprint(tmp_path)
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", output, *extra,
                 *(["--dry-run"] if dry else []))
    one_line_error(result, 2, needle)
    assert fingerprint(tmp_path) == before


def test_dry_run_with_a_good_output_writes_nothing(tmp_path, tiny_llama_dir):
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", "-o", tmp_path / "new" / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 13. windows longer than the model's context


@pytest.mark.parametrize("flag", ["--seqlen", "--eval-seqlen"])
@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_windows_beyond_the_context_are_refused_before_loading(tmp_path, tiny_llama_dir, monkeypatch, flag, dry):
    import prune_cli.run.dry_run as dry_run
    import prune_cli.run.job as job

    monkeypatch.setattr(job, "open_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(dry_run, "meta_model", lambda *a, **k: pytest.fail("model built"))
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", flag, "2048", "-o", tmp_path / "o",
                 *(["--dry-run"] if dry else []))
    one_line_error(result, 2, f"{flag} 2048 is longer than the model's context (1024 tokens")
    assert list(tmp_path.iterdir()) == []


def test_eval_seqlen_beyond_the_context_is_refused(checkpoint):
    result = run("eval", checkpoint, "--eval-seqlen", "4096", "--eval-windows", "1", "--device", "cpu")
    one_line_error(result, 2, "--eval-seqlen 4096 is longer than the model's context")


# ----------------------------------------------------------------------------- 15. file modes


def test_exported_files_get_the_users_umask(tmp_path, tiny_llama_dir):
    old = os.umask(0o022)
    try:
        result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", tmp_path / "o")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "o").iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes


# ----------------------------------------------------------------------------- usage errors of the option parser, as JSON


def test_parser_usage_errors_are_json_too(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "from prune_cli.cli import main; main()", "eval", "--eval-windows", "0", "--json"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    data = json.loads(proc.stdout)
    assert data["exit_code"] == 2 and data["error"]["type"] == "UsageError" and "--eval-windows" in data["error"]["message"]


# ----------------------------------------------------------------------------- 6./7. signals in a real process


def _start(stage: str, flag: Path, args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cli.signal_driver", stage, str(flag), "--", *map(str, args)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(flag: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the pause: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached its pause")
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_before_any_block_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, tiny_llama_dir, checkpoint, signum):
    """Ctrl-C or SIGTERM before any block is done (loading): the run's staging folder is removed,
    the previous checkpoint at --output is untouched, one line says so, and the exit code names
    the signal."""
    before = fingerprint(checkpoint.parent)
    flag = tmp_path / "reached"
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite", "--json"]
    proc = _start("load", flag, args, tmp_path)
    _wait_for(flag, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("stopped:") and signal.Signals(signum).name in last and "previous checkpoint" in last, err
    assert json.loads(out)["exit_code"] == 128 + signum
    assert fingerprint(checkpoint.parent) == before


@pytest.mark.parametrize("stage", ["calibration", "export"])
@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["SIGINT", "SIGTERM"])
def test_interrupt_after_a_block_keeps_the_resume_state_and_prints_the_command(tmp_path, tiny_llama_dir, checkpoint, stage, signum):
    """Ctrl-C or SIGTERM in a walk stops after the current block, at export at once; either way
    the resume state is kept beside --output (the previous checkpoint untouched), the last line
    gives the exact command that continues the run, and that command finishes it."""
    before = fingerprint(checkpoint)
    flag = tmp_path / "reached"
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite", "--json"]
    proc = _start(stage, flag, args, tmp_path)
    _wait_for(flag, proc)
    if stage == "export":
        assert list(checkpoint.parent.glob(".out.partial-*/model.safetensors"))  # the staging folder holds the weights
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    last = [l for l in err.splitlines() if l.strip()][-1]
    assert last.startswith("stopped:") and signal.Signals(signum).name in last and "resume state is kept" in last, err
    assert json.loads(out)["exit_code"] == 128 + signum
    assert fingerprint(checkpoint) == before
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[0] == "prune-cli" and command[-1] == "--resume"
    resumed = run(*command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed"] is not None
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["out"]


@pytest.mark.parametrize("stage,said", [("load", "left by a run that ended"),
                                        pytest.param("calibration", "left by a run that ended", marks=pytest.mark.slow),
                                        ("export", "supersedes")])
def test_sigkill_leftovers_are_cleaned_by_the_next_run(tmp_path, tiny_llama_dir, checkpoint, stage, said):
    """SIGKILL cannot be caught: the previous checkpoint is still intact, and the next run to
    the same output removes what the killed run left (its staging folder, its lock) and says so;
    a staging folder with resume state (after the walks, at export) is kept until this run's
    checkpoint supersedes it."""
    before = fingerprint(checkpoint)
    flag = tmp_path / "reached"
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite"]
    proc = _start(stage, flag, args, tmp_path)
    _wait_for(flag, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert fingerprint(checkpoint) == before
    leftovers = sorted(p.name for p in checkpoint.parent.iterdir() if p.name != "out")
    assert any(n.startswith(".out.partial-") for n in leftovers) and ".out.prune-cli.lock" in leftovers
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite")
    assert result.exit_code == 0, result.output
    assert said in result.stderr and f"PID {proc.pid}" in result.stderr
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["out"]


def test_sigkill_mid_walk_resumes_to_the_same_checkpoint(tmp_path, tiny_llama_dir):
    """A run killed (SIGKILL: nothing of it runs again) after the resume state of a block was
    written continues with --resume to exactly the checkpoint of an uninterrupted run."""
    args = ["--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "2", "--seqlen", "16", "--eval-windows", "1",
            "--eval-seqlen", "16", "--device", "cpu"]
    assert run("compress", tiny_llama_dir, *args, "-o", tmp_path / "reference").exit_code == 0
    out = tmp_path / "out"
    flag = tmp_path / "reached"
    proc = _start("resume-state", flag, ["compress", tiny_llama_dir, *args, "-o", out, "--checkpoint-interval", "0"], tmp_path)
    _wait_for(flag, proc)
    proc.kill()
    proc.wait(timeout=60)
    result = run("compress", tiny_llama_dir, *args, "-o", out, "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed"]["blocks_done"] == 1
    from safetensors.torch import load_file

    ours, theirs = (load_file(str(p / "model.safetensors")) for p in (out, tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "sparsity.json").read_text())["ppl"] == json.loads((tmp_path / "reference" / "sparsity.json").read_text())["ppl"]


def test_sigkill_during_the_overwrite_swap_restores_the_previous_checkpoint(tmp_path, tiny_llama_dir, checkpoint):
    previous = json.loads((checkpoint / "sparsity.json").read_text())
    flag = tmp_path / "reached"
    args = ["compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "-o", checkpoint, "--overwrite"]
    proc = _start("swap", flag, args, tmp_path)
    _wait_for(flag, proc)
    assert not checkpoint.exists()  # moved aside, the new one not yet in place
    proc.kill()
    proc.wait(timeout=60)
    result = run("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.6", *FAST, "-o", checkpoint)
    one_line_error(result, 2, "output exists")  # restored first, and then it exists: --overwrite is needed
    assert "restored the previous checkpoint" in result.stderr
    assert json.loads((checkpoint / "sparsity.json").read_text()) == previous
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["out"]


def test_a_full_disk_is_found_before_calibration(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    from prune_cli.calibrators import layerwise

    monkeypatch.setattr(layerwise, "capture_block_inputs", lambda *a, **k: pytest.fail("calibration started"))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1_000_000))
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *SMALL, "-o", tmp_path / "o")
    one_line_error(result, 2, "not enough free space")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 2./3./10./11./12. bad files, named in one line


def _truncated_model(tmp: Path, tiny_llama_dir: Path) -> Path:
    import shutil

    folder = tmp / "truncated"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _nan_model(tmp: Path, tiny_llama_dir: Path) -> Path:
    from tests.tiny_models import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    with __import__("torch").no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp / "nan")
    tiny_tokenizer().save_pretrained(tmp / "nan")
    return tmp / "nan"


def _teal_without_its_file(tmp: Path, tiny_llama_dir: Path) -> Path:
    out = tmp / "teal"
    result = run("compress", tiny_llama_dir, "--method", "teal", "--sparsity", "0.5", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    (out / "activation_sparsity.safetensors").unlink()
    return out


def _weightless(tmp: Path, tiny_llama_dir: Path) -> Path:
    import shutil

    folder = tmp / "weightless"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    return folder


def _recipe(body: bytes):
    def make(tmp: Path, tiny_llama_dir: Path) -> Path:
        (tmp / "recipe.yaml").write_bytes(body)
        return tmp / "recipe.yaml"

    return make


def _latin1_text(tmp: Path, tiny_llama_dir: Path) -> Path:
    from prune_cli.calibrators.sources import bundled_text

    text = bundled_text("calibration").text[:20000] + "\n\nCafé, naïve, déjà vu.\n"
    (tmp / "latin1.txt").write_bytes(text.encode("latin-1", errors="replace"))
    return tmp / "latin1.txt"


BAD_FILES = {
    # id: (make the file, the command line with {f} for it, exit code, needle)
    "compress-truncated-safetensors": (_truncated_model, ["compress", "{f}", "--method", "wanda", "--sparsity", "0.5"], 2, "is truncated"),
    "eval-truncated-safetensors": (_truncated_model, ["eval", "{f}"], 2, "is truncated"),
    "eval-activation-file-missing": (_teal_without_its_file, ["eval", "{f}"], 2, "activation_sparsity.safetensors"),
    "eval-no-weights": (_weightless, ["eval", "{f}"], 2, "no weight files in"),
    "nan-weight": (_nan_model, ["compress", "{f}", "--method", "wanda", "--sparsity", "0.5"], 2, "model.layers.1.mlp.down_proj"),
    "binary-recipe": (_recipe(b"\x7fELF\x00\x01\x02"), ["compress", "{m}", "--recipe", "{f}"], 2, "binary file"),
    "latin1-recipe": (_recipe("version: 1\nmethod: wanda\nsparsity: 0.5\nname: café\n".encode("latin-1")),
                      ["compress", "{m}", "--recipe", "{f}"], 2, "not UTF-8"),
    "method-as-list": (_recipe(b"version: 1\nmethod: [wanda]\nsparsity: 0.5\n"), ["compress", "{m}", "--recipe", "{f}"], 2,
                       "method must be a string"),
    "duplicate-key": (_recipe(b"version: 1\nmethod: wanda\nsparsity: 0.5\nsparsity: 0.7\n"), ["compress", "{m}", "--recipe", "{f}"], 2,
                      "duplicate key 'sparsity'"),
    "binary-calib-text": (lambda tmp, m: Path("/bin/ls"), ["compress", "{m}", "--method", "wanda", "--sparsity", "0.5", "--calib-text", "{f}"],
                          2, "/bin/ls"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_named_in_one_line(tmp_path, tiny_llama_dir, case):
    make, args, code, needle = BAD_FILES[case]
    made = make(tmp_path, tiny_llama_dir)
    out = tmp_path / "out"
    args = [a.format(f=made, m=tiny_llama_dir) for a in args]
    small = ["--eval-windows", "1", "--eval-seqlen", "16", "--device", "cpu"]
    if args[0] == "compress":
        small = ["--calib-samples", "2", "--seqlen", "16", *small, "-o", str(out)]
    before = fingerprint(tmp_path)
    result = run(*args, *small, "--json")
    data = one_line_error(result, code, needle, as_json=True)
    assert data["error"]["type"] != "Interrupted"
    assert fingerprint(tmp_path) == before


def test_latin1_calibration_text_is_read_with_a_warning(tmp_path, tiny_llama_dir):
    text = _latin1_text(tmp_path, tiny_llama_dir)
    result = run("compress", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", *FAST, "--calib-text", text, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warning = [l for l in result.stderr.splitlines() if "latin1.txt" in l]
    assert len(warning) == 1 and "warning:" in warning[0] and "not valid UTF-8" in warning[0], result.stderr
    assert "4 bytes" in warning[0]  # the four accented letters
