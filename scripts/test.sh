#!/usr/bin/env bash
# Set up, then run the test suite. pytest's exit status is passed on unchanged, so a
# failure fails and an empty run (status 5, nothing collected) fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
