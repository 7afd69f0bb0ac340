"""Read-ahead: `prune-cli compress` of a large random checkpoint from a cold page cache against
the same run from a warm one (goal: cold within 1.1x of warm).

    python bench/read_ahead.py [--depth 32] [--work /tmp/prune-cli-scale] [--rounds 2]
                               [--baseline OTHER_PRUNE_CLI] [--out docs/read_ahead.json]

The checkpoint is bench/memory_scale.py's (random bf16 Llama, hidden 2048, sharded safetensors;
32 blocks: 3.2 GB), written once into ``--work``. Each round runs, in its own process: a warm
run (every weight file read through first, so it sits in the page cache) and a cold run (the
page cache dropped first: ``sync; echo 3 > /proc/sys/vm/drop_caches``, which needs root).
Wanda 50%, 8 x 128 calibration tokens, --no-eval, CPU. Printed per run: wall time and the
report's ``timings.read`` (time spent waiting for block weights); the cold/warm ratio of the
median walls. ``--baseline`` runs another prune-cli executable the same way (e.g. the code
before read-ahead), for what read-ahead itself changed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.memory_scale import bundled_tokenizer, checkpoint  # noqa: E402

ARGS = ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "8", "--seqlen", "128", "--no-eval",
        "--device", "cpu", "--json"]
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def warm(model: Path) -> None:
    """Read every file of the checkpoint once (into the page cache)."""
    for path in sorted(model.iterdir()):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def run(cli: str, model: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([cli, "compress", str(model), *ARGS, "-o", str(out), "--overwrite"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cli} failed ({proc.returncode}): {proc.stderr[-500:]}")
    timings = json.loads(proc.stdout).get("timings", {})
    return {"wall_s": round(wall, 2), "read_s": round(timings.get("read", float("nan")), 2)}


def measure(cli: str, model: Path, out: Path, rounds: int, label: str) -> dict:
    runs: dict[str, list[dict]] = {"warm": [], "cold": []}
    for r in range(rounds):
        for mode in ("warm", "cold"):
            if mode == "warm":
                warm(model)
            else:
                drop_page_cache()
            result = run(cli, model, out)
            runs[mode].append(result)
            print(f"{label:9} round {r + 1} {mode}: wall {result['wall_s']:7.2f} s, waiting for weights {result['read_s']:6.2f} s",
                  flush=True)
    walls = {mode: statistics.median(r["wall_s"] for r in rs) for mode, rs in runs.items()}
    ratio = walls["cold"] / walls["warm"]
    print(f"{label:9} cold / warm wall (medians) {ratio:.3f} (goal <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'})", flush=True)
    return {"runs": runs, "median_wall_s": walls, "cold_over_warm": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-cli-scale"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="another prune-cli executable, measured the same way")
    parser.add_argument("--out", type=Path, help="write the results here (e.g. docs/read_ahead.json)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK):
        raise SystemExit("dropping the page cache needs root (/proc/sys/vm/drop_caches)")
    args.work.mkdir(parents=True, exist_ok=True)
    model, size = checkpoint(args.work, args.depth, args, bundled_tokenizer())
    print(f"{args.depth} blocks, {size / 1e9:.2f} GB checkpoint in {model}", flush=True)
    ours = str(Path(sys.executable).with_name("prune-cli"))
    results = {"setup": {"blocks": args.depth, "checkpoint_gb": round(size / 1e9, 3), "compress_args": ARGS,
                         "rounds": args.rounds, "baseline": args.baseline},
               "ours": measure(ours, model, args.work / "out-read-ahead", args.rounds, "ours")}
    if args.baseline:
        results["baseline"] = measure(args.baseline, model, args.work / "out-read-ahead-baseline", args.rounds, "baseline")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
