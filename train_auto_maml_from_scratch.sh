#!/usr/bin/env bash
# Train a genotype's network from scratch with MAML (auto-MAML / T-NAS) or MAML++ (--method maml++);
# the best checkpoint is chosen on the validation classes; writes train.json, best.pt, last.pt.
#   bash train_auto_maml_from_scratch.sh      # CPU demo on the embedded glyphs dataset, a few minutes
#   bash train_auto_maml_from_scratch.sh --config configs/scratch_miniimagenet_5w1s.yaml --data_path DIR \
#       [--genotype runs/auto_maml_search] [--out DIR] [more flags]
# Any extra flags are passed on to scripts/train_from_scratch.py (python scripts/train_from_scratch.py --help);
# relative paths in them are taken from the directory you run it in.
# The paper configs train the published auto-MAML genotype unless --genotype names another
# (a published name, a genotype JSON file, or a search run directory).
# Demo: trains the genotype of the auto-MAML demo search (runs/demo_auto_maml, from
# train_auto_maml.sh) into runs/demo_scratch_searched when that exists, else the published
# auto_maml_1shot genotype into runs/demo_scratch; rerunning resumes/finishes that run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
if [ "$#" -eq 0 ]; then
    if [ -f "$TNAS_REPO/runs/demo_auto_maml/genotype.json" ]; then
        genotype=runs/demo_auto_maml
        out=runs/demo_scratch_searched
    else
        genotype=auto_maml_1shot
        out=runs/demo_scratch
    fi
    run_demo train_auto_maml_from_scratch.sh "configs/demo_scratch.yaml, glyphs dataset, genotype $genotype" "$out" \
        scripts/train_from_scratch.py --config configs/demo_scratch.yaml --genotype "$genotype"
fi
say_what_runs train_auto_maml_from_scratch.sh "from-scratch training" "$@"
exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/train_from_scratch.py" "$@"
