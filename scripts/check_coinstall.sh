#!/usr/bin/env bash
# pip's resolver must accept llm-prune-cli beside the tools its users already have:
#   llm-compressor 0.14.0.1 with lm-eval 0.4.13, and vLLM 0.33.0 (each a dry run: nothing is installed).
# Usage: scripts/check_coinstall.sh [PYTHON]   (needs the package registry, not a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
status=0
for peers in "llmcompressor==0.14.0.1 lm-eval==0.4.13" "vllm==0.33.0"; do
    # shellcheck disable=SC2086
    if "${pip[@]}" install --quiet --dry-run --ignore-installed --report "$work/report.json" ".[eval]" $peers; then
        "$work/venv/bin/python" - "$work/report.json" "$peers" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
keys = ("llm-prune-cli", "torch", "transformers", "accelerate", "numpy")
print(f"resolves with {sys.argv[2]}: " + ", ".join(f"{k} {chosen.get(k, '-')}" for k in keys))
PY
    else
        echo "does NOT resolve with $peers" >&2
        status=1
    fi
done
exit $status
