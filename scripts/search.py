#!/usr/bin/env python
"""Architecture search: T-NAS (default) or auto-MAML meta-training of a DARTS supernet.

    python scripts/search.py --config configs/demo.yaml --out runs/demo_search
    python scripts/search.py --config configs/tnas_miniimagenet_5w1s.yaml --data_path DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tnas.config import parse_args  # noqa: E402
from tnas.errors import cli_entry  # noqa: E402
from tnas.stages import search  # noqa: E402


def main():
    search.run(parse_args(search.build_parser()))


if __name__ == "__main__":
    cli_entry(main)
