#!/usr/bin/env python
"""Architecture search: T-NAS (default) or auto-MAML meta-training of a DARTS supernet.

    python scripts/search.py --config configs/demo.yaml --out runs/demo_search
    python scripts/search.py --config configs/tnas_miniimagenet_5w1s.yaml --data_path DIR
"""
from tnas.config import parse_args
from tnas.errors import cli_entry
from tnas.stages import search


def main():
    search.run(search.settings_from_args(parse_args(search.build_parser())))


if __name__ == "__main__":
    cli_entry(main)
