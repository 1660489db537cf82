#!/usr/bin/env bash
# T-NAS search (meta-learns the supernet's weights and architecture).
#   bash train_tnas.sh                      # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_tnas.sh --config configs/tnas_miniimagenet_5w1s.yaml --data_path DIR [--out DIR] [more flags]
# Any extra flags are passed on to scripts/search.py (see: python scripts/search.py --help); relative paths in
# them are taken from the directory you run it in. The demo writes runs/demo_tnas in this checkout (rerunning it
# resumes/finishes that run; delete the directory to start over).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
if [ "$#" -eq 0 ]; then
    run_demo train_tnas.sh "configs/demo.yaml, glyphs dataset" runs/demo_tnas \
        scripts/search.py --method tnas --config configs/demo.yaml
fi
say_what_runs train_tnas.sh "T-NAS search" "$@"
exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/search.py" --method tnas "$@"
