"""prune-cli vs. llm-compressor, side by side on the bundled model: time and perplexity.

Methods: Wanda 50% unstructured, SparseGPT 50% unstructured, SparseGPT 2:4, and our ALPS 2:4
against their SparseGPT 2:4 (they have no ALPS; goal: perplexity <= 0.80x theirs) — on the bundled
SmolLM2-135M-Instruct (fp32, dequantized from its GGUF file), CPU, the decoder blocks' Linear
layers (never lm_head). Both sides get exactly the same token ids: calibration 32 x 512 (seed 0,
or each of --seeds: perplexities and their ratio are then means over the seeds, with the ratio's
standard deviation) and evaluation 16 x 512, built with prune-cli's own functions from the
bundled text.

llm-compressor is never a dependency of prune-cli: it lives in its own venv, `.venv-bench`
(it needs transformers <= 5.17; prune-cli pins 5.23). Set it up once, from the repo root:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf

Run, from the repo root, with prune-cli's own venv (on a quiet machine):

    .venv/bin/python bench/vs_llmcompressor.py [--repeats 3] [--samples 32] [--seqlen 512]
        [--eval-windows 16] [--batch-size 8] [--only wanda-50 sparsegpt-50 sparsegpt-2:4 alps-2:4]
        [--seeds 0 1 2]
        [--bench-python .venv-bench/bin/python] [--json FILE] [--verbose]

Two processes: this one (prune-cli, .venv, transformers 5.23) and a worker started with
`--bench-python` (llm-compressor, .venv-bench) that loads the same GGUF, checks that its dense
weights hash to the same fingerprint, reads the calibration windows from a .pt file in a temporary
folder and runs `oneshot(..., pipeline="sequential")` on a fresh copy of the dense model per
run. The worker hands back the pruned block Linear weights; both pruned models are then evaluated
here with the same function (`prune_cli.stages.evaluate.perplexity`), and their zero fractions measured.

Timed: only the pruning job — our `calibrate_and_prune` (which includes capturing the block
inputs), their `oneshot` call (which includes building the dataloader and tracing the model).
Not timed: loading, copying the dense model, evaluation. Repeats alternate ours/theirs.
Settings: same batch size both sides (llm-compressor's own default is 1); SparseGPT dampening
0.01 and block size 128 both sides; their mask_structure "0:0" = unstructured and "2:4" =
prune 2 of every 4 (= our keep 2 of 4). The worker forbids outgoing connections (and counts
attempts), besides HF_HUB_OFFLINE=1.

Goals reported against: SparseGPT (50% and 2:4) ours/theirs time <= 0.75 at perplexity
<= 1.02x theirs; Wanda ours/theirs time <= 0.8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"

# name -> (our recipe overrides, their modifier class, their modifier kwargs, goals)
METHODS: dict[str, tuple[dict, str, dict, dict]] = {
    "wanda-50": (
        {"method": "wanda", "sparsity": 0.5},
        "WandaPruningModifier",
        {"sparsity": 0.5, "mask_structure": "0:0"},
        {"time": 0.8},
    ),
    "sparsegpt-50": (
        {"method": "sparsegpt", "sparsity": 0.5},
        "SparseGPTModifier",
        {"sparsity": 0.5, "mask_structure": "0:0", "block_size": 128, "dampening_frac": 0.01},
        {"time": 0.75, "ppl": 1.02},
    ),
    "sparsegpt-2:4": (
        {"method": "sparsegpt", "pattern": "2:4"},
        "SparseGPTModifier",
        {"sparsity": 0.5, "mask_structure": "2:4", "block_size": 128, "dampening_frac": 0.01},
        {"time": 0.75, "ppl": 1.02},
    ),
    # ALPS against their best 2:4 method (they have no ALPS): a perplexity goal only, the time
    # ratio printed for what it is (a different algorithm)
    "alps-2:4": (
        {"method": "alps", "pattern": "2:4"},
        "SparseGPTModifier",
        {"sparsity": 0.5, "mask_structure": "2:4", "block_size": 128, "dampening_frac": 0.01},
        {"ppl": 0.80},
    ),
}


def fingerprint_state(model) -> str:
    """sha256 over every tensor of the state dict (sorted names, fp32 bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ================================================================ llm-compressor side (worker)


def _forbid_network() -> list[str]:
    """Make every outgoing socket connection fail, and remember the attempts."""
    import socket

    attempts: list[str] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(repr(address))
        raise OSError(f"network disabled by the benchmark (connect to {address!r})")

    for name in ("connect", "connect_ex"):
        setattr(socket.socket, name, refuse)
    return attempts


def worker(gguf_dir: str, gguf_file: str, tmp: str) -> None:
    """Serve pruning jobs: one JSON request per stdin line, one JSON reply per job on the
    original stdout (everything else printed goes to stderr)."""
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for key in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    attempts = _forbid_network()

    def reply(obj: dict) -> None:
        reply_stream.write(json.dumps(obj) + "\n")

    import copy

    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning
    from loguru import logger
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Their modifiers log "Sparsifying NAME using N samples" per Linear: collect these to check
    # that every targeted Linear was pruned from all calibration windows.
    sparsified: list[tuple[str, int]] = []

    def sink(message) -> None:
        found = re.match(r"Sparsifying (\S+) using (\d+) samples", message.record["message"])
        if found:
            # (0.14.0.1 names a module matched as its own target "NAME." - trailing dot)
            sparsified.append((found.group(1).rstrip("."), int(found.group(2))))

    logger.add(sink, level="INFO", format="{message}")

    torch.set_num_threads(os.cpu_count() or 1)
    pristine = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    pristine = pristine.to(torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    dense_fp = fingerprint_state(pristine)
    # oneshot re-reads the config from model.config.name_or_path (here a folder holding only
    # the GGUF file, so AutoConfig fails) and refuses a config whose quantization_config has a
    # quant_method other than compressed-tensors (GGUF's says "gguf"): point it at a folder
    # with the plain config. The weights are plain fp32 after dequantization.
    config_dir = Path(tmp) / "their-config"
    config = copy.deepcopy(pristine.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(config_dir)
    pristine.config._name_or_path = str(config_dir)
    # Hygiene, not needed by 0.14.0.1: drop the in-memory GGUF quantizer state too.
    pristine.hf_quantizer = None
    if hasattr(pristine.config, "quantization_config"):
        del pristine.config.quantization_config

    datasets: dict[str, tuple] = {}

    def calibration_set(name: str) -> tuple:
        """The calibration windows of one seed (a .pt file in ``tmp``) as their Dataset."""
        if name not in datasets:
            calibration: torch.Tensor = torch.load(Path(tmp) / name)["calibration"]
            dataset = Dataset.from_dict(
                {"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()}
            )
            datasets[name] = (calibration, dataset)
        return datasets[name]

    reply(
        {
            "ready": True,
            "fingerprint": dense_fp,
            "versions": {
                "llmcompressor": llmcompressor.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
            "threads": torch.get_num_threads(),
        }
    )

    def block_linear_weights(model) -> dict[str, torch.Tensor]:
        return {
            f"{name}.weight": module.weight.detach().clone()
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("model.layers.")
        }

    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        modifier = getattr(pruning, request["modifier"])(
            **request["kwargs"], targets=["Linear"], ignore=["re:.*lm_head"]
        )
        calibration, dataset = calibration_set(request["windows"])
        model = copy.deepcopy(pristine)
        sparsified.clear()
        start = time.perf_counter()
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=[modifier],
            num_calibration_samples=calibration.shape[0],
            max_seq_length=calibration.shape[1],
            batch_size=request["batch_size"],
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
        seconds = time.perf_counter() - start
        # Everything outside the block Linears must be untouched.
        pruned_names = set(block_linear_weights(model))
        other_diff = 0.0
        original = pristine.state_dict()
        for name, tensor in model.state_dict().items():
            if name not in pruned_names:
                other_diff = max(other_diff, float((tensor.float() - original[name].float()).abs().max()))
        if request.get("save"):
            torch.save(block_linear_weights(model), Path(tmp) / "theirs.pt")
        del model
        reply(
            {
                "seconds": seconds,
                "other_max_abs_diff": other_diff,
                "network_attempts": list(attempts),
                "sparsified": dict(sparsified),
            }
        )


class Worker:
    """The llm-compressor process, driven over its stdin/stdout."""

    def __init__(self, python: str, gguf_dir: str, gguf_file: str, tmp: str, verbose: bool):
        self.log_path = Path(tmp) / "llmcompressor.log"
        self.log = None if verbose else open(self.log_path, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", gguf_dir, gguf_file, tmp],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,  # None (verbose): inherit
            text=True,
            env=env,
            cwd=tmp,
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the llm-compressor worker exited ({self.proc.returncode}):\n{self.tail()}")
        return json.loads(line)

    def request(self, **payload) -> dict:
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def tail(self, lines: int = 40) -> str:
        if self.log is None:
            return "(see the output above)"
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


# ================================================================ prune-cli side (main)


def sparsity_of(weights: dict[str, torch.Tensor], nm: tuple[int, int] | None) -> dict:
    """Zero fractions of the pruned Linears (overall, per-layer min/max); for N:M, the
    fraction of groups of M along the input dimension holding at most N non-zeros."""
    zeros = total = 0
    per_layer = []
    groups_ok = groups = 0
    for w in weights.values():
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer.append(z / w.numel())
        if nm is not None:
            keep, m = nm
            nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
            groups_ok += int((nonzero <= keep).sum())
            groups += nonzero.numel()
    out = {"overall": zeros / total, "min": min(per_layer), "max": max(per_layer), "layers": len(per_layer)}
    if nm is not None:
        out["nm_groups_ok"] = groups_ok / groups
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt_time(s: dict) -> str:
    return f"{s['median']:7.2f} s [{s['min']:.2f}, {s['max']:.2f}]"


def fmt_sparsity(s: dict) -> str:
    text = f"{s['overall']:.4f} (layers {s['min']:.4f}..{s['max']:.4f})"
    if "nm_groups_ok" in s:
        text += f", N:M groups ok {100 * s['nm_groups_ok']:.2f}%"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (calibration and evaluation)")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size, both sides")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds (perplexities: mean over them)")
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run (default: all)")
    parser.add_argument("--bench-python", default=str(DEFAULT_BENCH_PYTHON), help="python of the llm-compressor venv")
    parser.add_argument("--json", help="also write the results into this file (e.g. docs/vs_llmcompressor.json)")
    parser.add_argument("--run-name", default="latest", help="the entry of --json's runs this invocation writes")
    parser.add_argument("--verbose", action="store_true", help="show llm-compressor's own log output")
    parser.add_argument("--worker", nargs=3, metavar=("GGUF_DIR", "GGUF_FILE", "TMP"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc", action="store_true", help="our side: leave glibc malloc as it is")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not args.default_malloc:  # our side runs as the prune-cli entry point does; theirs is untouched
        from prune_cli.core.allocator import keep_freed_memory

        print(f"our side: keep_freed_memory() -> {keep_freed_memory()}", flush=True)
    if not Path(args.bench_python).exists():
        sys.exit(f"{args.bench_python} not found: set up .venv-bench first (see this script's docstring)")

    import transformers

    import prune_cli
    from prune_cli.calibrators.sampling import calibration_windows, evaluation_windows, fingerprint, tokenize
    from prune_cli.calibrators.sources import bundled_text
    from prune_cli.core.patterns import NM
    from prune_cli.model.source import bundled_source
    from prune_cli.recipe.config import resolve
    from prune_cli.recipe.plan import build_plan
    from prune_cli.stages.evaluate import perplexity
    from prune_cli.stages.pruning import calibrate_and_prune
    from prune_cli.streaming.loader import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    names = args.only or list(METHODS)

    source = bundled_source()
    model, tokenizer = load_model(source)
    calibration_ids = tokenize(tokenizer, bundled_text("calibration").text)
    cals = {seed: calibration_windows(calibration_ids, args.samples, args.seqlen, seed=seed) for seed in args.seeds}
    ev = evaluation_windows(tokenize(tokenizer, bundled_text("evaluation").text), args.eval_windows, args.seqlen)
    dense_fp = fingerprint_state(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}

    with tempfile.TemporaryDirectory(prefix="vs-llmcompressor-") as tmp:
        for seed, cal in cals.items():
            torch.save({"calibration": cal}, Path(tmp) / f"windows-{seed}.pt")
        print("starting the llm-compressor worker (loading the model there) ...", file=sys.stderr, flush=True)
        theirs_proc = Worker(args.bench_python, source.location, source.gguf_file, tmp, args.verbose)
        try:
            hello = theirs_proc.read()
            if hello["fingerprint"] != dense_fp:
                raise SystemExit(
                    f"the two sides loaded different dense weights ({dense_fp} vs {hello['fingerprint']}): not comparable"
                )
            dense_ppl = perplexity(model, ev).ppl
            ours_versions = {"prune_cli": prune_cli.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
            print(f"prune-cli {ours_versions} vs llm-compressor {hello['versions']}")
            print(
                f"bundled model fp32 on CPU, threads ours {torch.get_num_threads()} / theirs {hello['threads']}; "
                f"dense weights identical on both sides (sha256 {dense_fp})"
            )
            seeds_text = ", ".join(f"seed {seed} ids {fingerprint(cal)}" for seed, cal in cals.items())
            print(
                f"calibration {args.samples}x{args.seqlen} ({seeds_text}), evaluation "
                f"{args.eval_windows}x{args.seqlen} (ids {fingerprint(ev)}), batch {args.batch_size}, repeats {args.repeats}"
            )
            print(f"dense ppl {dense_ppl:.4f}", flush=True)

            results = []
            for name in names:
                overrides, modifier, kwargs, goals = METHODS[name]
                config = resolve(None, overrides)
                nm = (config.pattern.n_keep, config.pattern.m) if isinstance(config.pattern, NM) else None
                ours_t, theirs_t = [], []
                per_seed = []
                checks = {}
                for seed, cal in cals.items():
                    for r in range(args.repeats):
                        last = r == args.repeats - 1
                        model.load_state_dict(dense_state)
                        plan = build_plan(model, config)
                        start = time.perf_counter()
                        calibrate_and_prune(model, plan, cal, args.batch_size, device)
                        ours_t.append(time.perf_counter() - start)
                        if last:  # keep our pruned weights before the model is reused below
                            ours_weights = {f"{lp.name}.weight": model.get_submodule(lp.name).weight.detach().clone() for lp in plan.layers}
                        answer = theirs_proc.request(
                            modifier=modifier, kwargs=kwargs, batch_size=args.batch_size, save=last, windows=f"windows-{seed}.pt"
                        )
                        theirs_t.append(answer["seconds"])
                        checks = {"other_max_abs_diff": answer["other_max_abs_diff"], "network_attempts": answer["network_attempts"]}
                        expected = {lp.name for lp in plan.layers}
                        if set(answer["sparsified"]) != expected or set(answer["sparsified"].values()) != {args.samples}:
                            seen = sorted(set(answer["sparsified"].values()))
                            odd = sorted(set(answer["sparsified"]) ^ expected)[:4]
                            raise SystemExit(
                                f"{name}: llm-compressor sparsified {len(answer['sparsified'])} Linears with sample counts "
                                f"{seen}; expected the {len(expected)} planned ones with {args.samples} samples each "
                                f"(differing names, e.g. {odd})"
                            )
                        print(f"  {name} seed {seed} run {r + 1}/{args.repeats}: ours {ours_t[-1]:.2f} s, theirs {theirs_t[-1]:.2f} s", flush=True)

                    # ours: evaluate our pruned weights
                    model.load_state_dict(dense_state)
                    model.load_state_dict(ours_weights, strict=False)
                    ours_ppl = perplexity(model, ev).ppl
                    ours_sp = sparsity_of(ours_weights, nm)
                    # theirs: their pruned block Linears into the same dense model, same evaluation
                    their_weights = torch.load(Path(tmp) / "theirs.pt")
                    if set(their_weights) != set(ours_weights):
                        raise SystemExit(f"{name}: llm-compressor pruned a different set of Linears than prune-cli")
                    model.load_state_dict(dense_state)
                    model.load_state_dict(their_weights, strict=False)
                    theirs_ppl = perplexity(model, ev).ppl
                    theirs_sp = sparsity_of(their_weights, nm)
                    per_seed.append({"seed": seed, "ours_ppl": ours_ppl, "theirs_ppl": theirs_ppl, "ppl_ratio": ours_ppl / theirs_ppl})
                    print(f"  {name} seed {seed}: ppl ours {ours_ppl:.4f}, theirs {theirs_ppl:.4f}, ratio {ours_ppl / theirs_ppl:.4f}", flush=True)

                ot, tt = spread(ours_t), spread(theirs_t)
                time_ratio = ot["median"] / tt["median"]
                ratios = [s["ppl_ratio"] for s in per_seed]
                ppl_ratio = statistics.mean(ratios)
                ppl_ratio_sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
                ours_ppl = statistics.mean(s["ours_ppl"] for s in per_seed)
                theirs_ppl = statistics.mean(s["theirs_ppl"] for s in per_seed)
                verdicts = {}
                if "time" in goals:
                    verdicts["time"] = time_ratio <= goals["time"]
                if "ppl" in goals:
                    verdicts["ppl"] = ppl_ratio <= goals["ppl"]
                row = {
                    "method": name,
                    "ours": {"seconds": ot, "ppl": ours_ppl, "sparsity": ours_sp},
                    "theirs": {"seconds": tt, "ppl": theirs_ppl, "sparsity": theirs_sp, **checks},
                    "seeds": per_seed,
                    "time_ratio": time_ratio,
                    "time_ratio_min_max": [ot["min"] / tt["max"], ot["max"] / tt["min"]],
                    "ppl_ratio": ppl_ratio,
                    "ppl_ratio_sd": ppl_ratio_sd,
                    "goals": goals,
                    "met": verdicts,
                }
                results.append(row)
                many = len(per_seed) > 1
                print(f"{name}" + (f" (perplexities: means over seeds {', '.join(map(str, cals))})" if many else ""))
                print(f"  ours   time {fmt_time(ot)}  ppl {ours_ppl:10.4f}  zeros {fmt_sparsity(ours_sp)}")
                print(f"  theirs time {fmt_time(tt)}  ppl {theirs_ppl:10.4f}  zeros {fmt_sparsity(theirs_sp)}")
                lo, hi = row["time_ratio_min_max"]
                line = f"  ours/theirs time {time_ratio:.3f} (range {lo:.3f}..{hi:.3f}"
                if "time" in goals:
                    line += f"; goal <= {goals['time']}: {'met' if verdicts['time'] else 'NOT met'}"
                line += f")  ppl {ppl_ratio:.4f}" + (f" +- {ppl_ratio_sd:.4f}" if many else "")
                if "ppl" in goals:
                    line += f" (goal <= {goals['ppl']}: {'met' if verdicts['ppl'] else 'NOT met'})"
                print(line)
                print(
                    f"  checks: llm-compressor pruned the same {len(ours_weights)} Linears, each from {args.samples} "
                    f"windows; max change outside them {checks['other_max_abs_diff']:g}; "
                    f"network attempts {len(checks['network_attempts'])}"
                )
                print(flush=True)
        finally:
            theirs_proc.close()

    print("| method | ours s (median [min, max]) | theirs s | time ratio | ours ppl | theirs ppl | ppl ratio | goals |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        o, t = row["ours"], row["theirs"]
        goals = ", ".join(
            f"{k} <= {v} {'met' if row['met'][k] else 'NOT met'}" for k, v in row["goals"].items()
        )
        print(
            f"| {row['method']} | {o['seconds']['median']:.1f} [{o['seconds']['min']:.1f}, {o['seconds']['max']:.1f}] "
            f"| {t['seconds']['median']:.1f} [{t['seconds']['min']:.1f}, {t['seconds']['max']:.1f}] "
            f"| {row['time_ratio']:.3f} | {o['ppl']:.3f} | {t['ppl']:.3f} | {row['ppl_ratio']:.4f} | {goals} |"
        )
    if args.json:
        payload = {
            "setup": {k: v for k, v in vars(args).items() if k != "worker"},
            "versions": {"ours": ours_versions, "theirs": hello["versions"]},
            "threads": torch.get_num_threads(),
            "dense_fingerprint": dense_fp,
            "calibration_ids": {str(seed): fingerprint(cal) for seed, cal in cals.items()},
            "evaluation_ids": fingerprint(ev),
            "dense_ppl": dense_ppl,
            "runs": results,
        }
        # one file per benchmark: each invocation is a named entry of its "runs"
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        merged["runs"][args.run_name] = payload
        path.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
