#!/usr/bin/env bash
# Score a checkpoint on fixed test episodes; every argument goes to scripts/evaluate.py.
#   ./evaluate.sh --checkpoint runs/train_tnas --episodes 600 --seed 0
set -euo pipefail
exec "${PYTHON:-python}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/scripts/evaluate.py" "$@"
