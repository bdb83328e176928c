#!/usr/bin/env bash
# Check the import contracts of pyproject.toml ([tool.importlinter]) with import-linter.
# The linter walks the installed package's folders; kvcast's parts live beside kvcast/ in the repository
# (pyproject's package-dir), so it analyses a non-editable install of the working tree in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cp -r pyproject.toml README.md LICENSE kvcast codec streamer netsim policies traces "$TMP/"
find "$TMP" -name __pycache__ -prune -exec rm -rf {} +
.venv/bin/pip install -q --no-deps --no-build-isolation --target "$TMP/site" "$TMP" 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
rm -rf "${TMP:?}/kvcast"
cd "$TMP/site" && PYTHONPATH="$TMP/site" "$ROOT/.venv/bin/lint-imports" --no-cache "$ROOT/pyproject.toml"
