#!/usr/bin/env bash
# The whole T-NAS / T-NAS++ protocol on fixed test tasks: decode each task's genotype from a T-NAS search
# checkpoint, train each distinct genotype from scratch (genotypes already trained are skipped, interrupted
# ones resumed), score each task with its own genotype's network; writes OUT/results.json.
#   bash evaluate_tnas.sh                  # CPU demo on runs/demo_tnas (make it first: bash train_tnas.sh)
#   bash evaluate_tnas.sh --config configs/protocol_miniimagenet_5w1s.yaml --checkpoint runs/tnas_5w1s [--budget]
#   NPROC=8 bash evaluate_tnas.sh ...      # the same under torchrun, 8 processes (one GPU each)
# Every argument goes to scripts/evaluate_tnas.py (python scripts/evaluate_tnas.py --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
[ -n "${TNAS_TRAIN_ONLY:-}" ] || print_header_on_help "$0" "${1:-}"
launch=("$TNAS_PYTHON")
if [ -n "${NPROC:-}" ]; then
    launch=("$TNAS_PYTHON" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC")
fi
# train_tnas_from_scratch.sh runs this script with TNAS_TRAIN_ONLY=1: decode and train, no scoring.
name=evaluate_tnas.sh; mode=()
if [ -n "${TNAS_TRAIN_ONLY:-}" ]; then
    name=train_tnas_from_scratch.sh; mode=(--train_only)
fi
if [ "$#" -eq 0 ]; then
    demo="${TNAS_DEMO_SEARCH:-$TNAS_REPO/runs/demo_tnas}"
    if [ ! -f "$demo/best.pt" ]; then
        echo "$name: no demo T-NAS search checkpoint in $demo; run 'bash train_tnas.sh' first (a few minutes on CPU)" >&2
        exit 2
    fi
    echo "$name: no arguments, running the CPU demo protocol (configs/demo_protocol.yaml) on $demo ${mode[*]:-}"
    exec "${launch[@]}" "$TNAS_REPO/scripts/evaluate_tnas.py" --config "$TNAS_REPO/configs/demo_protocol.yaml" --checkpoint "$demo" ${mode[@]+"${mode[@]}"}
fi
exec "${launch[@]}" "$TNAS_REPO/scripts/evaluate_tnas.py" ${mode[@]+"${mode[@]}"} "$@"
