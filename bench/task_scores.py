"""The offline task suite on the bundled SmolLM2-135M: dense and compressed scores per method,
over several calibration seeds (prune_cli.stages.tasks; the suite: bench/make_task_suite.py).

    python bench/task_scores.py [--seeds 0 1 2] [--out docs/task_scores.json]

Every run is one ``prune-cli compress --json`` process with ``--eval-tasks prune_cloze,prune_lastword``
(every example: 207 four-way cloze items, 112 last words), calibration 16 x 256 tokens of the
bundled calibration text (seed from ``--seeds``), perplexity on 8 x 256 held-out tokens, CPU. The
dense scores are measured once (the dense-baseline cache, kept in a temporary folder) and are the
same for every run. Prints each run and writes JSON; the table in docs/quality.md comes from
bench/make_tables.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WINDOWS = ["--calib-samples", "16", "--seqlen", "256", "--eval-windows", "8", "--eval-seqlen", "256", "--device", "cpu",
           "--eval-tasks", "prune_cloze,prune_lastword"]
METHODS = [
    ("magnitude 50%", ["--method", "magnitude", "--sparsity", "0.5"]),
    ("wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
    ("sparsegpt 50%", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
    ("sparsegpt 2:4", ["--method", "sparsegpt", "--pattern", "2:4"]),
]


def run_one(cli: Path, args: list[str], out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([str(cli), "compress", *args, *WINDOWS, "-o", str(out), "--overwrite", "--json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    report = json.loads(proc.stdout)
    tasks = report["tasks"]
    return {"ppl": report["ppl"], "dense": tasks["dense"], "compressed": tasks["compressed"],
            "requests": tasks["requests"], "baseline_cached": tasks["baseline_cached"],
            "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "task_scores.json")
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("prune-cli")
    results: dict = {"setup": {"args": WINDOWS, "seeds": args.seeds, "model": "bundled SmolLM2-135M-Instruct"}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PRUNE_CLI_CACHE"] = str(Path(tmp) / "cache")  # the dense baseline for this bench only
        for method, method_args in METHODS:
            runs = {}
            for seed in args.seeds:
                runs[f"seed {seed}"] = run_one(cli, [*method_args, "--seed", str(seed)], Path(tmp) / "out")
                r = runs[f"seed {seed}"]
                print(method, f"seed {seed}", r["ppl"]["compressed"],
                      {t: v["metrics"].get("acc") for t, v in r["compressed"].items()}, flush=True)
            results["runs"][method] = runs
            args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
