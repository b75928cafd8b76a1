#!/usr/bin/env bash
# Set up, then run the main job: every rule on the bundled digits, 3 seeds each.
# Extra arguments go to `bpalt compare` (for example --rules bp,fa --epochs 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bpalt compare "$@"
