#!/usr/bin/env python
"""Score a checkpoint on fixed test episodes: accuracy mean +- 95% CI, written to results.json.

    python scripts/evaluate.py --checkpoint runs/train_tnas --device cuda
    python scripts/evaluate.py --checkpoint runs/search/best.pt --episodes 600 --seed 0 \\
        --episodes_file runs/test_episodes.npz --update_step_test 10 --batch_size 50
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tnas.config import parse_args  # noqa: E402
from tnas.errors import cli_entry  # noqa: E402


def main(argv=None):
    from tnas.stages import evaluate

    evaluate.run(parse_args(evaluate.build_parser(), argv))


if __name__ == "__main__":
    cli_entry(main)
