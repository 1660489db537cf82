#!/usr/bin/env bash
# T-NAS search (meta-learns the supernet's weights and architecture).
#   bash train_tnas.sh                      # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_tnas.sh --config configs/tnas_miniimagenet_5w1s.yaml --data_path DIR [--out DIR] [more flags]
# Any extra flags are passed on to scripts/search.py (see: python scripts/search.py --help).
set -euo pipefail
cd "$(dirname "$0")"
if [ "$#" -eq 0 ]; then
    echo "train_tnas.sh: no arguments, running the CPU demo (configs/demo.yaml, glyphs dataset) into runs/demo_tnas"
    exec python scripts/search.py --method tnas --config configs/demo.yaml --out runs/demo_tnas \
        $( [ -f runs/demo_tnas/last.pt ] && echo --resume )
fi
echo "train_tnas.sh: T-NAS search with: $*"
exec python scripts/search.py --method tnas "$@"
