#!/usr/bin/env bash
# The import layers (pyproject.toml [tool.importlinter]) and "no import cycles", checked on the
# layout the wheel installs: gpu/ and calibrators/ inside prune_cli/ (an editable install maps
# them with an import hook that import-linter cannot follow, so a copy is checked).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(cd "${1:-$root/.venv/bin}" && pwd)"  # absolute: the check runs in a temporary folder
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$root/prune_cli" "$tmp/prune_cli"
cp -r "$root/gpu" "$tmp/prune_cli/gpu"
cp -r "$root/calibrators" "$tmp/prune_cli/calibrators"
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
cd "$tmp"
PYTHONPATH="$tmp" "$bin/lint-imports" "$root/pyproject.toml"
PYTHONPATH="$tmp" "$bin/python" "$root/scripts/find_import_cycles.py"
