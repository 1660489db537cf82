#!/usr/bin/env python
"""The T-NAS / T-NAS++ protocol: per-task genotypes from a T-NAS search checkpoint, each distinct genotype
trained from scratch (MAML / MAML++), each test task scored by its own genotype's network; results.json.

    python scripts/evaluate_tnas.py --checkpoint runs/tnas_5w1s --method tnas \\
        --train_config configs/scratch_miniimagenet_5w1s.yaml --episodes 600 --seed 0
    python scripts/evaluate_tnas.py --config configs/protocol_plusplus_miniimagenet_5w1s.yaml \\
        --checkpoint runs/tnas_5w1s --budget
    torchrun --nproc_per_node=8 scripts/evaluate_tnas.py --config configs/protocol_miniimagenet_5w1s.yaml \\
        --checkpoint runs/tnas_5w1s
"""
from tnas.config import parse_args
from tnas.errors import cli_entry
from tnas.stages import protocol


def main(argv=None):
    protocol.run(protocol.settings_from_args(parse_args(protocol.build_parser(), argv)))


if __name__ == "__main__":
    cli_entry(main)
