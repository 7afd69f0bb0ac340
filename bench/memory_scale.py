"""Peak memory of `prune-cli compress` as the model grows deeper: random-weight Llama checkpoints
(bfloat16, sharded safetensors, hidden 2048, intermediate 5632, GQA 32/4 heads, untied 49152
vocabulary with the bundled SmolLM2 tokenizer) of 4, 8, 16 and 32 blocks, each compressed with
Wanda 50% (8 x 128 calibration tokens, 2 x 128 evaluation tokens) in its own process; peak RSS
from the kernel's accounting of that process (``wait4``'s ``ru_maxrss``).

    python bench/memory_scale.py [--depths 4 8 16 32] [--work /tmp/prune-cli-scale]
                                 [--baseline OTHER_PRUNE_CLI] [--out docs/scale.json]
    python bench/memory_scale.py --add-float32      # ours again with --dtype float32, into --out

``--dtype auto`` computes these bfloat16 checkpoints in bfloat16 on a CPU with fast bfloat16
kernels (AVX512-BF16) and in float32 elsewhere; the in-memory baseline always computed in
float32. ``--add-float32`` adds a like-for-like float32 run of ours to each row of ``--out``.

``--baseline`` runs a second ``prune-cli`` executable on the same checkpoints (e.g. an older,
in-memory version in another virtual environment) for the same table. Checkpoints are written
once into ``--work`` (several GB) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARGS = ["--method", "wanda", "--sparsity", "0.5", "--calib-samples", "8", "--seqlen", "128",
        "--eval-windows", "2", "--eval-seqlen", "128", "--device", "cpu", "--json"]


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from prune_cli.model.source import bundled_source

    source = bundled_source()
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def checkpoint(work: Path, depth: int, args, tokenizer) -> tuple[Path, int]:
    from tests.random_checkpoints import write_random_llama

    folder = work / f"llama-h{args.hidden}-L{depth}"
    done = folder / "done.json"
    if done.is_file():
        return folder, json.loads(done.read_text())["bytes"]
    size = write_random_llama(folder, depth, args.hidden, args.intermediate, args.heads, args.kv_heads, tokenizer,
                              max_shard_bytes=1 << 30)
    done.write_text(json.dumps({"bytes": size}))
    return folder, size


def run_child(cli: str, model: Path, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One compress in a child process, with its own peak RSS (wait4, not the children maximum)."""
    start = time.perf_counter()
    with open(out.with_suffix(".stdout"), "w") as so, open(out.with_suffix(".stderr"), "w") as se:
        proc = subprocess.Popen([cli, "compress", str(model), *ARGS, *extra, "-o", str(out), "--overwrite"],
                                stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cli} failed on {model}: {out.with_suffix('.stderr').read_text()[-500:]}")
    report = json.loads(out.with_suffix(".stdout").read_text())
    return {"peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3), "wall_s": round(wall, 1),
            "ppl_compressed": report["ppl"]["compressed"], "dtype": report.get("dtype", "float32"),
            "timings": report.get("timings")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prune-cli-scale"))
    parser.add_argument("--baseline", help="another prune-cli executable to measure on the same checkpoints")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.json")
    parser.add_argument("--add-float32", action="store_true", help="add ours with --dtype float32 to the rows of --out")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = bundled_tokenizer()
    ours = str(Path(sys.executable).with_name("prune-cli"))
    if args.add_float32:
        data = json.loads(args.out.read_text())
        for row in data["rows"]:
            model, _ = checkpoint(args.work, row["blocks"], args, tokenizer)
            row["prune_cli_float32"] = run_child(ours, model, args.work / "out", ("--dtype", "float32"))
            print(f"{row['blocks']:3d} blocks  float32: peak RSS {row['prune_cli_float32']['peak_rss_gb']:.2f} GB"
                  f"  {row['prune_cli_float32']['wall_s']:.0f} s", flush=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        return
    rows = []
    for depth in args.depths:
        model, size = checkpoint(args.work, depth, args, tokenizer)
        row = {"blocks": depth, "checkpoint_gb": round(size / 1e9, 3), "prune_cli": run_child(ours, model, args.work / "out")}
        if args.baseline:
            row["baseline"] = run_child(args.baseline, model, args.work / "out-baseline")
        rows.append(row)
        base = f" | baseline {row['baseline']['peak_rss_gb']:.2f} GB {row['baseline']['wall_s']:.0f} s" if args.baseline else ""
        print(f"{depth:3d} blocks  {row['checkpoint_gb']:.2f} GB checkpoint  peak RSS {row['prune_cli']['peak_rss_gb']:.2f} GB"
              f"  {row['prune_cli']['wall_s']:.0f} s{base}", flush=True)
    first, last = rows[0]["prune_cli"]["peak_rss_gb"], rows[-1]["prune_cli"]["peak_rss_gb"]
    print(f"peak RSS {rows[-1]['blocks']} vs {rows[0]['blocks']} blocks: x{last / first:.3f} "
          f"(checkpoint x{rows[-1]['checkpoint_gb'] / rows[0]['checkpoint_gb']:.2f})")
    setup = {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads")}
    args.out.write_text(json.dumps({"setup": {**setup, "compress_args": ARGS, "baseline": args.baseline}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
