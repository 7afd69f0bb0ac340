"""The peak memory `compress --dry-run` predicts against what the run needs: for random bf16
Llamas of 4, 8, 16, 24 and 32 blocks (hidden 2048, untied 49k vocabulary, the checkpoints of
bench/memory_scale.py), the run is given a Linux memory cgroup of 1.15 x its predicted peak and
must finish inside it; printed: its peak resident anonymous memory (the cgroup's ``total_rss``,
sampled every 50 ms) over the prediction.

    python bench/memory_prediction.py [--depths 4 8 16 24 32] [--work /tmp/prune-cli-scale]
                                      [--out docs/memory_prediction.json]

Needs root and a writable cgroup v1 memory controller (/sys/fs/cgroup/memory). Wanda 50%,
4 x 128 calibration tokens, --no-eval (the issue's setting), and again with the default
evaluation (16 x 512 windows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.memory_scale import bundled_tokenizer, checkpoint  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/memory")
MARGIN = 1.15
SETTINGS = {
    "no eval": ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4", "--seqlen", "128", "--no-eval"],
    "eval": ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "4", "--seqlen", "128"],
}


def predicted(cli: str, model: Path, args: list[str]) -> dict:
    out = subprocess.run([cli, "compress", str(model), *args, "--device", "cpu", "--dry-run", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["memory"]


def run_limited(cli: str, model: Path, args: list[str], limit: int, work: Path) -> dict:
    group = CGROUP / f"prune-cli-prediction-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    out = work / "out-prediction"
    shutil.rmtree(out, ignore_errors=True)
    command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', cli, "compress", str(model), *args,
               "--device", "cpu", "--json", "-o", str(out)]
    env = {**os.environ, "PRUNE_CLI_CACHE": str(work / "cache-prediction")}
    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    while proc.poll() is None:
        try:
            stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            peak = max(peak, int(stat["total_rss"]))
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    stderr = proc.stderr.read() if proc.stderr else ""
    group.rmdir()
    shutil.rmtree(out, ignore_errors=True)
    return {"returncode": proc.returncode, "peak_anon_bytes": peak, "wall_s": round(time.perf_counter() - start, 1),
            "stderr_tail": stderr[-300:] if proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 24, 32])
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-cli-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory_prediction.json")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    if not (CGROUP / "cgroup.procs").exists():
        raise SystemExit(f"needs a cgroup v1 memory controller at {CGROUP}")
    args.work.mkdir(parents=True, exist_ok=True)
    shape = argparse.Namespace(hidden=2048, intermediate=5632, heads=32, kv_heads=4)
    tokenizer = bundled_tokenizer()
    cli = str(Path(sys.executable).with_name("prune-cli"))
    rows = []
    for depth in args.depths:
        model, size = checkpoint(args.work, depth, shape, tokenizer)
        for setting in args.settings:
            prediction = predicted(cli, model, SETTINGS[setting])
            limit = int(MARGIN * prediction["predicted_peak"])
            run = run_limited(cli, model, SETTINGS[setting], limit, args.work)
            ratio = run["peak_anon_bytes"] / prediction["predicted_peak"]
            rows.append({"blocks": depth, "checkpoint_gb": round(size / 1e9, 3), "setting": setting,
                         "prediction": prediction, "cgroup_limit_bytes": limit, **run, "measured_over_predicted": round(ratio, 3)})
            print(f"{depth:3d} blocks {size / 1e9:5.2f} GB {setting:8s} predicted {prediction['predicted_peak'] / 1e9:.2f} GB, "
                  f"limit {limit / 1e9:.2f} GB: rc {run['returncode']}, peak {run['peak_anon_bytes'] / 1e9:.2f} GB "
                  f"= {ratio:.2f}x predicted, {run['wall_s']:.0f} s", flush=True)
    setup = {"margin": MARGIN, "settings": {k: SETTINGS[k] for k in args.settings}, "cpu_threads": os.cpu_count()}
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
