#!/usr/bin/env bash
# Score a checkpoint on fixed test episodes; every argument goes to scripts/evaluate.py.
#   bash evaluate.sh --checkpoint runs/demo_scratch_searched --episodes 600 --seed 0   # a run directory: its best.pt
# results.json goes to the checkpoint's run directory unless --out DIR.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"; echo;; esac  # --help: this header first
exec "${PYTHON:-python}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/scripts/evaluate.py" "$@"
