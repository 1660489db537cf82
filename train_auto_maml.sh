#!/usr/bin/env bash
# auto-MAML search: one architecture for all tasks (an alpha-step and a weight-step every iteration, on
# two halves of each class's images); writes search.json, genotype.json, best_genotype.json (the best
# validation epoch's, what --genotype RUN_DIR trains), cell diagrams and best.pt / last.pt.
#   bash train_auto_maml.sh               # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_auto_maml.sh --config configs/auto_maml_miniimagenet_5w1s.yaml --data_path DIR [--out DIR] [more flags]
# Any extra flags are passed on to scripts/search.py (see: python scripts/search.py --help); relative paths in
# them are taken from the directory you run it in.
# The demo writes runs/demo_auto_maml in this checkout (rerunning it resumes/finishes that run; delete the
# directory to start over); train_auto_maml_from_scratch.sh then trains its genotype.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
if [ "$#" -eq 0 ]; then
    run_demo train_auto_maml.sh "configs/demo_auto_maml.yaml, glyphs dataset" runs/demo_auto_maml \
        scripts/search.py --method auto_maml --config configs/demo_auto_maml.yaml
fi
say_what_runs train_auto_maml.sh "auto-MAML search" "$@"
exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/search.py" --method auto_maml "$@"
