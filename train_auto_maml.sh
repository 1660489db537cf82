#!/usr/bin/env bash
# auto-MAML search: one architecture for all tasks (weights and alphas updated in turn, on two
# halves of each class's images); writes genotype.json, cell diagrams and search.json.
#   bash train_auto_maml.sh               # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_auto_maml.sh --config configs/auto_maml_miniimagenet_5w1s.yaml --data_path DIR [--out DIR] [more flags]
# Any extra flags are passed on to scripts/search.py (see: python scripts/search.py --help); relative paths in
# them are taken from the directory you run it in.
# The demo writes runs/demo_auto_maml in this checkout (rerunning it resumes/finishes that run; delete the
# directory to start over); train_auto_maml_from_scratch.sh then trains its genotype.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/s/^# \{0,1\}//p' "$0"; echo;; esac  # --help: this header first
if [ "$#" -eq 0 ]; then
    cd "$repo"
    echo "train_auto_maml.sh: no arguments, running the CPU demo (configs/demo_auto_maml.yaml, glyphs dataset) into runs/demo_auto_maml"
    exec "$python" scripts/search.py --method auto_maml --config configs/demo_auto_maml.yaml --out runs/demo_auto_maml \
        $( [ -f runs/demo_auto_maml/last.pt ] && echo --resume )
fi
case "$1" in -h|--help) ;; *) echo "train_auto_maml.sh: auto-MAML search with: $*" ;; esac
exec "$python" "$repo/scripts/search.py" --method auto_maml "$@"
