"""The streamed compress and eval with --device cuda on a stand-in model (a tiny random Llama of
4 blocks saved as a checkpoint folder), against the same commands on the CPU: exit code, perplexity
(relative difference) and mask agreement per recipe. Part of scripts/gpu_check.sh; prints one
markdown table. Without CUDA it says so and exits 2; ``--smoke`` runs both sides on the CPU (to
check the script itself where there is no GPU)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = {
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "owl-wanda-70": ["--method", "wanda", "--sparsity", "0.7", "--layerwise", "owl"],
    "wina-greedy-50": ["-r", str(ROOT / "recipes" / "wina-greedy-50.yaml")],
    "wanda-50-disk": ["--method", "wanda", "--sparsity", "0.5", "--max-memory", "1"],
}
SMALL = ["--calib-samples", "8", "--seqlen", "64", "--eval-windows", "4", "--eval-seqlen", "64"]


def main() -> int:
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from prune_cli.cli import app
    from tests.tiny_models import save_tiny_model

    smoke = "--smoke" in sys.argv[1:]
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing checked", file=sys.stderr)
        return 2
    gpu = "cpu" if smoke else "cuda"
    runner = CliRunner()
    work = Path(tempfile.mkdtemp(prefix="gpu-streamed-"))
    model = save_tiny_model("llama", work / "model", layers=4)
    rows, failed = [], False
    for name, args in RECIPES.items():
        results = {}
        for device in ("cpu", gpu):
            out = work / f"{name}-{device}"
            r = runner.invoke(app, ["compress", str(model), *args, *SMALL, "--device", device, "-o", str(out), "--json"])
            e = runner.invoke(app, ["eval", str(out), "--eval-windows", "4", "--eval-seqlen", "64", "--device", device, "--json"])
            results[device] = (r, e, out)
            if smoke:
                results[gpu] = results["cpu"] = (r, e, out)
                break
        (rc, ec, oc), (rg, eg, og) = results["cpu"], results[gpu]
        ok = rc.exit_code == rg.exit_code == ec.exit_code == eg.exit_code == 0
        if not ok:
            failed = True
            rows.append(f"| {name} | FAILED cpu {rc.exit_code}/{ec.exit_code} cuda {rg.exit_code}/{eg.exit_code}: "
                        f"{(rg.stderr or rc.stderr).strip().splitlines()[-1][:120] if (rg.stderr or rc.stderr).strip() else ''} | | |")
            continue
        pc, pg = json.loads(rc.stdout)["ppl"]["compressed"], json.loads(rg.stdout)["ppl"]["compressed"]
        ev = json.loads(eg.stdout)["ppl"]
        wc, wg = load_file(str(oc / "model.safetensors")), load_file(str(og / "model.safetensors"))
        agree = sum(int(((wc[k] == 0) == (wg[k] == 0)).sum()) for k in wc) / sum(wc[k].numel() for k in wc)
        rows.append(f"| {name} | {pc:.4f} / {pg:.4f} (eval on cuda {ev:.4f}) | {abs(pg - pc) / pc:.2e} | {agree:.5f} |")
    print("| recipe | compressed ppl cpu / cuda | rel. diff | zero positions agreeing |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
