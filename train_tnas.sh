#!/usr/bin/env bash
# T-NAS search (meta-learns the supernet's weights and architecture).
#   bash train_tnas.sh                      # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_tnas.sh --config configs/tnas_miniimagenet_5w1s.yaml --data_path DIR [--out DIR] [more flags]
# Any extra flags are passed on to scripts/search.py (see: python scripts/search.py --help); relative paths in
# them are taken from the directory you run it in. The demo writes runs/demo_tnas in this checkout (rerunning it
# resumes/finishes that run; delete the directory to start over).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"; echo;; esac  # --help: this header first
if [ "$#" -eq 0 ]; then
    cd "$repo"
    echo "train_tnas.sh: no arguments, running the CPU demo (configs/demo.yaml, glyphs dataset) into runs/demo_tnas"
    exec "$python" scripts/search.py --method tnas --config configs/demo.yaml --out runs/demo_tnas \
        $( [ -f runs/demo_tnas/last.pt ] && echo --resume )
fi
case "$1" in -h|--help) ;; *) echo "train_tnas.sh: T-NAS search with: $*" ;; esac
exec "$python" "$repo/scripts/search.py" --method tnas "$@"
