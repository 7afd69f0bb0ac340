#!/usr/bin/env bash
# One prepared GPU check: run it from anywhere on a machine with an NVIDIA GPU.
#
#   1. make sure prune_cli (with prune_cli.gpu) imports and CuPy is there (installs the [gpu]
#      extra's packages if needed: from wheels in .whl/ when present, else with pip);
#   2. pytest -m gpu tests/gpu          (CuPy kernels vs the torch backend, bit for bit / in tolerance)
#   3. pytest -m 'not gpu' tests/gpu    (compile check with this machine's NVRTC, host-code tests)
#   4. python bench/gpu_kernels.py      (timings, bytes/s vs copy bandwidth, speedups; the DSnoT
#      swap kernel vs the torch loop on a Llama-like block, goal >= 10x; the activation-threshold
#      radix select, rows act_threshold, vs torch kthvalue)
#   5. python bench/gpu_compress.py   (the whole compress job per recipe with the torch and the cupy
#      backend: stage times, speedup, perplexities, checkpoint / threshold agreement)
#   6. python scripts/gpu_streamed_check.py (--device cuda compress + eval of a stand-in model: the
#      block driver's placement on a real GPU, perplexity and masks against the same on the CPU);
#   7. writes a short markdown summary to $OUT/gpu_results.md (logs beside it: 8 files at most,
#      what the device tool brings back).
#
# Each step has its own time limit, cut to what is left of a 9-minute deadline (GPU_CHECK_DEADLINE
# seconds), so the summary is always written inside the device tool's 10-minute command limit.
# Environment: OUT (output folder; default out/gpu-check), PYTHON (default python3),
# GPU_CHECK_NO_INSTALL=1 (never pip install anything).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
DEADLINE=${GPU_CHECK_DEADLINE:-540}
MD=$(mktemp -d)  # markdown pieces, folded into gpu_results.md (not brought back on their own)
status=0
log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
# limit STEP_SECONDS: the smaller of a step's own limit and what is left before the deadline (>= 10)
limit() { local left=$((DEADLINE - ($(date +%s) - START))); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }

{
  log "python: $($PY -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true

  # --- prune_cli importable (the gpu/ and calibrators/ folders are mapped by setuptools)
  if [ -z "${GPU_CHECK_NO_INSTALL:-}" ] && ! $PY -c "import prune_cli.gpu.backend, prune_cli.calibrators.stats" 2>/dev/null; then
    log "installing prune-cli (editable, no dependencies)"
    timeout 180 $PY -m pip install -q --no-deps --no-build-isolation -e . \
      || timeout 180 $PY -m pip install -q --no-deps -e . || true
  fi
  if ! $PY -c "import prune_cli.gpu.backend, prune_cli.calibrators.stats" 2>/dev/null; then
    log "editable install failed: mapping the package folders with a sitecustomize shim"
    SHIM=$(mktemp -d)
    cat > "$SHIM/sitecustomize.py" <<EOF
import importlib.util, sys
_MAP = {"prune_cli.gpu": "$ROOT/gpu", "prune_cli.calibrators": "$ROOT/calibrators"}
class _Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        folder = _MAP.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder + "/__init__.py", submodule_search_locations=[folder])
sys.meta_path.insert(0, _Finder)
EOF
    export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi

  # --- CuPy (the [gpu] extra)
  if [ -z "${GPU_CHECK_NO_INSTALL:-}" ] && ! $PY -c "import cupy" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      log "installing CuPy from .whl/"
      timeout 180 $PY -m pip install -q --no-index --no-deps .whl/*.whl || true
    else
      GPU_PKGS=$($PY - <<'EOF'
import tomllib, torch
extra = "gpu-cuda13" if (torch.version.cuda or "").startswith("13") else "gpu"  # CuPy must match torch's CUDA
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"].get(extra, [])))
EOF
)
      log "installing the gpu extra: $GPU_PKGS"
      timeout 240 $PY -m pip install -q $GPU_PKGS || log "could not install CuPy (offline?)"
    fi
  fi
  $PY - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("cupy unavailable:", type(exc).__name__, exc)
EOF
} > "$OUT/setup.log" 2>&1  # a redirect, not a pipe: PYTHONPATH set above must stay in this shell
cat "$OUT/setup.log"

log "pytest -m gpu tests/gpu"
timeout $(limit 240) $PY -m pytest -q -rs -m gpu -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log"
rc_gpu=${PIPESTATUS[0]}
[ "$rc_gpu" = 0 ] || status=1

log "pytest -m 'not gpu' tests/gpu"
timeout $(limit 150) $PY -m pytest -q -rs -m "not gpu" -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest_cpu.log"
rc_cpu=${PIPESTATUS[0]}
[ "$rc_cpu" = 0 ] || status=1

log "bench/gpu_kernels.py"
timeout $(limit 180) $PY bench/gpu_kernels.py --markdown "$MD/bench.md" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
rc_bench=${PIPESTATUS[0]}
[ "$rc_bench" = 0 ] || status=1

log "bench/gpu_compress.py"
timeout $(limit 240) $PY bench/gpu_compress.py --markdown "$MD/compress.md" --json "$OUT/compress.json" 2>&1 | tee "$OUT/compress.log"
rc_compress=${PIPESTATUS[0]}
[ "$rc_compress" = 0 ] || status=1

log "scripts/gpu_streamed_check.py (--device cuda compress + eval of a stand-in model, against the CPU)"
timeout $(limit 150) $PY scripts/gpu_streamed_check.py 2>&1 | tee "$OUT/streamed.log"
rc_streamed=${PIPESTATUS[0]}
[ "$rc_streamed" = 0 ] || status=1

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $(grep -m1 '^torch ' "$OUT/setup.log")"
  echo "- $(grep -m1 -E '^cupy' "$OUT/setup.log")"
  echo "- pytest -m gpu tests/gpu (exit $rc_gpu): $(tail -n 1 "$OUT/pytest_gpu.log")"
  echo "- pytest -m 'not gpu' tests/gpu (exit $rc_cpu): $(tail -n 1 "$OUT/pytest_cpu.log")"
  echo "- bench/gpu_kernels.py (exit $rc_bench), bench/gpu_compress.py (exit $rc_compress), total script time $(($(date +%s) - START)) s"
  echo "- $(grep -m1 '^dsnot_swap: speedup' "$OUT/bench.log" || echo 'dsnot_swap: no speedup line (see bench.log)')"
  echo
  if [ -s "$MD/bench.md" ]; then cat "$MD/bench.md"; else echo '(no kernel benchmark table; see bench.log)'; fi
  echo
  echo "## Streamed compress and eval on --device cuda vs cpu (exit $rc_streamed)"
  echo
  grep '^|' "$OUT/streamed.log" || echo '(no table; see streamed.log)'
  echo
  echo "## Whole compress per backend"
  echo
  if [ -s "$MD/compress.md" ]; then cat "$MD/compress.md"; else echo '(no compress table; see compress.log)'; fi
  if [ "$rc_gpu" != 0 ]; then
    echo
    echo "## Failing GPU tests"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR)' "$OUT/pytest_gpu.log" | head -40
    echo '```'
  fi
} > "$OUT/gpu_results.md"
cat "$OUT/gpu_results.md"
log "done (status $status)"
exit $status
