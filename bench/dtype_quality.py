"""Quality at bfloat16 vs float32 compute on the bundled model: the same Wanda 50% job with
``--dtype float32`` and ``--dtype bfloat16`` (export in float32 both ways, so only the compute
differs), over several calibration seeds; dense and compressed held-out perplexity.

    python bench/dtype_quality.py [--seeds 0 1 2] [--samples 4] [--seqlen 256] [--eval-windows 4]
        [--threads 1] [--out docs/dtype_quality.json]

Small windows on purpose: a CPU without native bfloat16 kernels (this project's AVX2 machine)
multiplies bfloat16 matrices at about 1 GFLOP/s, so one bfloat16 run takes ~20 minutes here.
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


def run(dtype: str, seed: int, args, out: Path) -> dict:
    cli = str(Path(sys.executable).with_name("prune-cli"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run([cli, "compress", "--method", "wanda", "--sparsity", "0.5", "--calib-samples", str(args.samples),
                           "--seqlen", str(args.seqlen), "--seed", str(seed), "--eval-windows", str(args.eval_windows),
                           "--eval-seqlen", str(args.seqlen), "--device", "cpu", "--dtype", dtype, "--save-dtype", "float32",
                           "-o", str(out), "--overwrite", "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    report = json.loads(proc.stdout)
    return {"dtype": dtype, "seed": seed, "dense": report["ppl"]["dense"], "compressed": report["ppl"]["compressed"],
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dtype_quality.json")
    args = parser.parse_args()
    work = Path("/tmp/prune-cli-dtype")
    rows = []
    for seed in args.seeds:
        for dtype in args.dtypes:
            row = run(dtype, seed, args, work / f"{dtype}-{seed}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps({"setup": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows},
                                           indent=2, default=str) + "\n")
    for dtype in args.dtypes:
        for key in ("dense", "compressed"):
            values = [r[key] for r in rows if r["dtype"] == dtype]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{dtype} {key}: mean {statistics.mean(values):.3f} sd {spread:.3f} over {len(values)} seeds {values}")


if __name__ == "__main__":
    main()
