#!/usr/bin/env bash
# The T-NAS paper's main table from your own run: MAML (Conv-4), auto-MAML, T-NAS and T-NAS++, 5-way 1- and
# 5-shot, mean +- 95% CI over 600 fixed test tasks, beside the paper's figures, in OUT/table.md and table.json.
#   bash reproduce_paper.sh                 # CPU demo on the embedded glyphs dataset (12 CPU-minutes), runs/reproduce_demo
#   bash reproduce_paper.sh --data_path ~/data/mini-imagenet --out runs/reproduce --device cuda
#   bash reproduce_paper.sh --data_path DIR --budget --shots 1 --methods maml,tnas   # short schedules, marked so
# Rerunning the same command skips finished steps and resumes interrupted ones. Every argument goes to
# scripts/reproduce.py (python scripts/reproduce.py --help).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/scripts/entry_point.sh"
print_header_on_help "$0" "${1:-}"
if [ "$#" -eq 0 ]; then
    echo "reproduce_paper.sh: no arguments, running the CPU demo (configs/reproduce_demo.yaml, glyphs dataset) into runs/reproduce_demo"
    exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/reproduce.py" --demo
fi
case " $* " in
    *" --data_path "*|*" --data_path="*|*" --demo "*|*" --plan "*|*" --plan="*|*" --help "*|*" -h "*) ;;
    *) set -- --demo "$@" ;;  # no dataset named: the demo, with the flags given (e.g. --out DIR)
esac
exec "$TNAS_PYTHON" "$TNAS_REPO/scripts/reproduce.py" "$@"
