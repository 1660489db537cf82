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
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
launch=("$python")
if [ -n "${NPROC:-}" ]; then
    launch=("$python" -m torch.distributed.run --standalone "--nproc_per_node=$NPROC")
fi
if [ "$#" -eq 0 ]; then
    demo="${TNAS_DEMO_SEARCH:-$repo/runs/demo_tnas}"
    if [ ! -f "$demo/best.pt" ]; then
        echo "train_tnas_from_scratch.sh: no demo T-NAS search checkpoint in $demo; run 'bash train_tnas.sh' first (a few minutes on CPU)" >&2
        exit 2
    fi
    echo "train_tnas_from_scratch.sh: no arguments, training the demo protocol's genotypes (configs/demo_protocol.yaml) on $demo"
    exec "${launch[@]}" "$repo/scripts/evaluate_tnas.py" --config "$repo/configs/demo_protocol.yaml" --checkpoint "$demo" --train_only
fi
exec "${launch[@]}" "$repo/scripts/evaluate_tnas.py" --train_only "$@"
