"""Batch-1 greedy decode speed of the bundled model: dense vs activation sparsity (WINA
thresholds with the gather decode path), measured in one run on the CPU.

    python bench/decode_speed.py [--levels 0.25 0.4 0.5] [--new-tokens 64] [--repeats 3]

Decode tokens/s = (new_tokens - 1) / (time(generate new_tokens) - time(generate 1 token)),
so the prompt's prefill is excluded. The achieved sparsity is counted in a separate, untimed
generation (counting reads every mask back). Prints each rate and the ratio to dense (goal at 50%:
>= 1.4x; the ceiling is about 1.65x because lm_head's 28M weights stay dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from prune_cli.activation import build_activation_method  # noqa: E402
from prune_cli.activation.modules import count_sparsity, unwrap_all  # noqa: E402
from prune_cli.calibrators.sampling import calibration_windows, evaluation_windows, tokenize  # noqa: E402
from prune_cli.calibrators.sources import bundled_text  # noqa: E402
from prune_cli.model.source import bundled_source  # noqa: E402
from prune_cli.runtime import prepare_decode  # noqa: E402
from prune_cli.stages.activation import activation_targets, calibrate_activation, uniform_allocation  # noqa: E402
from prune_cli.streaming.loader import load_model  # noqa: E402


@torch.no_grad()
def decode_rate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, list[float]]:
    def run(n):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - start

    run(4)  # warm-up
    rates = []
    for _ in range(repeats):
        rates.append((new_tokens - 1) / (run(new_tokens) - run(1)))
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=float, nargs="*", default=[0.25, 0.4, 0.5])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="wina")
    args = parser.parse_args()

    model, tokenizer = load_model(bundled_source())
    cal = calibration_windows(tokenize(tokenizer, bundled_text("calibration").text), 8, 256, 0)
    prompt = evaluation_windows(tokenize(tokenizer, bundled_text("evaluation").text), 1, 32)
    targets = activation_targets(model, lambda name: True)
    dense, dense_all = decode_rate(model, prompt, args.new_tokens, args.repeats)
    print(f"threads {torch.get_num_threads()}  dense: {dense:.2f} tok/s  {[round(r, 2) for r in dense_all]}", flush=True)
    method = build_activation_method(args.method)
    for level in args.levels:
        calibrate_activation(model, targets, method, uniform_allocation(targets, level), cal, 8, torch.device("cpu"), 4096, 0)
        prepare_decode(model)
        rate, all_rates = decode_rate(model, prompt, args.new_tokens, args.repeats)
        with count_sparsity(model) as counted:  # counted apart: counting syncs on every call
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0)
        print(f"{args.method} {level:.0%}: {rate:.2f} tok/s  x{rate / dense:.3f} vs dense  "
              f"(achieved during decode {counted.overall('input'):.1%})  {[round(r, 2) for r in all_rates]}", flush=True)
        unwrap_all(model)


if __name__ == "__main__":
    main()
