#!/usr/bin/env python
"""Train a genotype's network from scratch with MAML (T-NAS, auto-MAML) or MAML++ (T-NAS++).

    python scripts/train_from_scratch.py --config configs/demo_scratch.yaml --out runs/demo_scratch
    python scripts/train_from_scratch.py --config configs/scratch_miniimagenet_5w1s.yaml --data_path DIR \\
        --genotype runs/auto_maml_miniimagenet_5w1s
    python scripts/train_from_scratch.py --genotype auto_maml_1shot --method maml++ ...
"""
from tnas.config import parse_args
from tnas.errors import cli_entry
from tnas.stages import train


def main():
    train.run(train.settings_from_args(parse_args(train.build_parser())))


if __name__ == "__main__":
    cli_entry(main)
