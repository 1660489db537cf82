#!/usr/bin/env python
"""Score a checkpoint on fixed test episodes: accuracy mean +- 95% CI, written to results.json.

    python scripts/evaluate.py --checkpoint runs/train_tnas --device cuda
    python scripts/evaluate.py --checkpoint runs/search/best.pt --episodes 600 --seed 0 \\
        --episodes_file runs/test_episodes.npz --update_step_test 10 --batch_size 50
"""
from tnas.config import parse_args
from tnas.errors import cli_entry
from tnas.stages import evaluate


def main(argv=None):
    evaluate.run(evaluate.settings_from_args(parse_args(evaluate.build_parser(), argv)))


if __name__ == "__main__":
    cli_entry(main)
