#!/usr/bin/env bash
# Score a checkpoint on fixed test episodes; every argument goes to scripts/evaluate.py.
#   bash evaluate.sh --checkpoint runs/demo_scratch_searched --episodes 600 --seed 0   # a run directory: its best.pt
# results.json goes to the checkpoint's run directory unless --out DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/evaluate.py" "$@"
