#!/usr/bin/env bash
# T-NAS / T-NAS++ from-scratch training: decode each test task's genotype from a T-NAS search checkpoint and
# train each distinct genotype once (MAML for --method tnas, MAML++ for --method tnas++) into
# OUT/genotypes/gNNNN/, without scoring (scripts/evaluate_tnas.py --train_only). Rerun it to resume; then
# evaluate_tnas.sh with the same flags skips the trained genotypes and writes results.json.
#   bash train_tnas_from_scratch.sh        # CPU demo on runs/demo_tnas (make it first: bash train_tnas.sh)
#   bash train_tnas_from_scratch.sh --config configs/protocol_miniimagenet_5w1s.yaml --checkpoint runs/tnas_5w1s
#   NPROC=8 bash train_tnas_from_scratch.sh ...   # under torchrun: the genotypes are shared among 8 processes
# Every argument goes to scripts/evaluate_tnas.py (python scripts/evaluate_tnas.py --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
TNAS_TRAIN_ONLY=1 exec bash "$TNAS_REPO/evaluate_tnas.sh" "$@"
