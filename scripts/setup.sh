#!/usr/bin/env bash
# Create .venv (if missing) and install bpalt with its test dependencies into it.
# Needs Python >= 3.10 on PATH (python3.11 preferred) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ]; then
  echo "setup: no python3 found on PATH; install Python >= 3.10 or set PYTHON" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
