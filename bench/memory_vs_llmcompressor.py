"""Peak memory and wall time of the whole job, prune-cli vs llm-compressor, on the bundled model.

Each side is one process doing the same job from the same GGUF file to a checkpoint on disk:

* ours: ``prune-cli compress`` (the bundled SmolLM2-135M, streamed block by block, float32
  compute, ``--save-dtype float32``, ``--no-eval``), twice: "cold" with an empty cache folder
  (the run dequantises the GGUF file into its cache, :mod:`prune_cli.checkpoint.gguf_cache`), then "warm"
  (reading that cache);
* theirs: load the model with transformers (float32), ``oneshot(..., pipeline="sequential")``
  with the same modifier settings as ``bench/vs_llmcompressor.py``, ``save_pretrained``;

on exactly the same calibration token ids (32 x 512, seed 0, built here with prune-cli's own
functions; our report's token fingerprint is checked against them). Peak RSS is each child's
own (``wait4``'s ``ru_maxrss``), wall time from start to exit. Goal (issue 12): ours <= 0.6x
their peak memory at equal or better time (the ratios are the cold run's and the warm run's).

    .venv/bin/python bench/memory_vs_llmcompressor.py [--only wanda-50 sparsegpt-50 sparsegpt-2:4]
        [--repeats 1] [--bench-python .venv-bench/bin/python] [--json docs/memory_vs_llmcompressor.json]

(llm-compressor lives in its own venv: ``make bench-venv``.)
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_llmcompressor import METHODS, _forbid_network  # noqa: E402

SAMPLES, SEQLEN, BATCH = 32, 512, 8


def their_side(gguf_dir: str, gguf_file: str, windows_path: str, modifier_name: str, kwargs: str, out: str) -> None:
    """The llm-compressor child: load, oneshot, save (run by the bench venv's python)."""
    import copy

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _forbid_network()
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config_dir = Path(out).parent / "their-config"  # see vs_llmcompressor.worker: oneshot re-reads the config
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(config_dir)
    model.config._name_or_path = str(config_dir)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    calibration = torch.load(windows_path)
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    modifier = getattr(pruning, modifier_name)(**json.loads(kwargs), targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=[modifier], num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1], batch_size=BATCH, shuffle_calibration_samples=False, pipeline="sequential")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def child(command: list[str], env: dict | None = None) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        out.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{command[0]} failed:\n{err.read()[-3000:]}")
        return {"peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3), "wall_s": round(wall, 1), "stdout": out.read()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--bench-python", default=str(REPO / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "memory_vs_llmcompressor.json")
    parser.add_argument("--their-side", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.their_side:
        their_side(*args.their_side)
        return

    import torch

    from prune_cli.calibrators.sampling import calibration_windows, fingerprint, tokenize
    from prune_cli.calibrators.sources import bundled_text
    from prune_cli.model.source import bundled_source
    from prune_cli.streaming.loader import load_tokenizer

    source = bundled_source()
    windows = calibration_windows(tokenize(load_tokenizer(source), bundled_text("calibration").text), SAMPLES, SEQLEN, 0)
    work = Path(tempfile.mkdtemp(prefix="prune-cli-mem-"))
    torch.save(windows, work / "windows.pt")
    cli = str(Path(sys.executable).with_name("prune-cli"))
    rows = []
    for name in args.only:
        ours_overrides, modifier, kwargs, _ = METHODS[name]
        flags = ["--method", ours_overrides["method"]]
        flags += ["--pattern", ours_overrides["pattern"]] if "pattern" in ours_overrides else ["--sparsity", str(ours_overrides["sparsity"])]
        for repeat in range(args.repeats):
            cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
            ours_env = {**os.environ, "PRUNE_CLI_CACHE": str(cache)}
            command = [cli, "compress", *flags, "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--seed", "0",
                       "--no-eval", "--device", "cpu", "--save-dtype", "float32", "-o", str(work / "ours"), "--overwrite", "--json"]
            cold = child(command, env=ours_env)
            ours = child(command, env=ours_env)
            for run in (cold, ours):
                report = json.loads(run.pop("stdout"))
                assert report["calibration"]["tokens_sha256"] == fingerprint(windows), "the two sides saw other tokens"
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            theirs = child([args.bench_python, str(Path(__file__).resolve()), "--their-side", source.location, source.gguf_file,
                            str(work / "windows.pt"), modifier, json.dumps(kwargs), str(work / "theirs")], env=env)
            theirs.pop("stdout")
            row = {"method": name, "repeat": repeat, "ours_cold": cold, "ours": ours, "theirs": theirs,
                   "memory_ratio_cold": round(cold["peak_rss_gb"] / theirs["peak_rss_gb"], 3),
                   "time_ratio_cold": round(cold["wall_s"] / theirs["wall_s"], 3),
                   "memory_ratio": round(ours["peak_rss_gb"] / theirs["peak_rss_gb"], 3),
                   "time_ratio": round(ours["wall_s"] / theirs["wall_s"], 3)}
            rows.append(row)
            print(f"{name}: theirs {theirs['peak_rss_gb']:.2f} GB {theirs['wall_s']:.1f} s; ours cold {cold['peak_rss_gb']:.2f} GB "
                  f"{cold['wall_s']:.1f} s (memory x{row['memory_ratio_cold']:.3f}, time x{row['time_ratio_cold']:.3f}), "
                  f"warm {ours['peak_rss_gb']:.2f} GB {ours['wall_s']:.1f} s (memory x{row['memory_ratio']:.3f}, time "
                  f"x{row['time_ratio']:.3f}); goals memory <= 0.6, time <= 1", flush=True)
    args.json.write_text(json.dumps({"setup": {"samples": SAMPLES, "seqlen": SEQLEN, "batch_size": BATCH,
                                               "threads": os.cpu_count()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
