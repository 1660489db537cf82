#!/usr/bin/env python
"""One genotype per fixed test episode from a T-NAS search checkpoint (JSON lines + a summary).

    python scripts/decode.py --checkpoint runs/search --episodes 600 --seed 0
    python scripts/decode.py --checkpoint runs/search/best.pt --episodes_file runs/test_episodes.npz \\
        --out runs/search/episode_genotypes.jsonl
"""
from tnas.config import parse_args
from tnas.errors import cli_entry
from tnas.stages import decode


def main(argv=None):
    decode.run(decode.settings_from_args(parse_args(decode.build_parser(), argv)))


if __name__ == "__main__":
    cli_entry(main)
