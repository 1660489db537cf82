"""Show a genotype: its cells, the derived network's parameter count and MACs, optional diagrams.

    python scripts/genotype.py auto_maml_1shot
    python scripts/genotype.py runs/search/genotype.json --plot runs/search/cells
    python scripts/genotype.py runs/search --json

NAME_OR_JSON is a published name (auto_maml_1shot, auto_maml_5shot), a genotype JSON file,
a run directory (a search's best_genotype.json, that of its best.pt; else its genotype.json),
or a JSON object given inline ('{"normal": ...}').
MACs are per image, counted by ptflops (convolutions, linear, BatchNorm, pooling and
elementwise ops) and checked against a count of convolution + linear MACs alone.
"""
import argparse
import json
import os

import torch

from tnas.config import HelpFormatter, parse_flags
from tnas.errors import TnasError, cli_entry
from tnas.genotypes import PUBLISHED, Genotype, genotype_from_dict, resolve_genotype
from tnas.models.complexity import count_macs
from tnas.models.network import Network
from tnas.models.skeleton import min_image_size
from tnas.visualize import plot_genotype


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Print a genotype with its derived network's parameter count and MACs; optionally draw its cells.",
        formatter_class=HelpFormatter)
    parser.add_argument("genotype", metavar="NAME_OR_JSON",
                        help=f"published name ({', '.join(PUBLISHED)}), genotype JSON file, run directory "
                             "(its best_genotype.json, else genotype.json), or an inline JSON object")
    parser.add_argument("--n_way", type=int, default=5, help="classes of the classifier")
    parser.add_argument("--C", type=int, default=16, help="channels of the first cell (doubled at each reduction)")
    parser.add_argument("--layers", type=int, default=2, help="number of cells (2: normal + reduction)")
    parser.add_argument("--img_size", type=int, default=84, help="input height and width in pixels")
    parser.add_argument("--in_channels", type=int, default=3, help="image channels: 3 for RGB, 1 for grayscale")
    parser.add_argument("--plot", metavar="DIR", default=None,
                        help="write normal.{dot,png} and reduce.{dot,png} cell diagrams to DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; a bad or unknown one is a one-line error (:func:`tnas.config.parse_flags`)."""
    return parse_flags(build_parser(), argv)


def load(name_or_json: str) -> Genotype:
    """A published name, a file or run directory, or an inline JSON object."""
    if name_or_json.lstrip().startswith("{") and not os.path.exists(name_or_json):
        try:
            data = json.loads(name_or_json)
        except json.JSONDecodeError as error:
            raise TnasError(f"inline genotype: invalid JSON at column {error.colno}: {error.msg}") from None
        return genotype_from_dict(data, source="inline genotype")
    return resolve_genotype(name_or_json)


def check_sizes(args: argparse.Namespace) -> None:
    for flag in ("n_way", "C", "layers", "in_channels"):
        if getattr(args, flag) < 1:
            raise TnasError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    smallest = min_image_size(args.layers)
    if args.img_size < smallest:
        raise TnasError(f"--img_size {args.img_size} is too small for --layers {args.layers}: "
                        f"need at least {smallest} (stem /4, each reduction /2)")


def human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.{1 if unit == 'K' else 2}f}{unit}"
    return str(int(count))


def format_cell(genotype: Genotype, cell: str) -> str:
    pairs = getattr(genotype, cell)
    nodes = [f"node {i // 2}: {pairs[i][0]} <- {pairs[i][1]}, {pairs[i + 1][0]} <- {pairs[i + 1][1]}"
             for i in range(0, len(pairs), 2)]
    concat = list(getattr(genotype, f"{cell}_concat"))
    return f"{cell} cell (inputs 0, 1 = previous cells, 2.. = nodes; concat {concat}):\n    " + "\n    ".join(nodes)


def main(argv=None) -> int:
    args = parse_args(argv)
    genotype = load(args.genotype)
    check_sizes(args)
    torch.manual_seed(0)
    model = Network(genotype, n_way=args.n_way, C=args.C, layers=args.layers, in_channels=args.in_channels)
    parameters = sum(p.numel() for p in model.parameters())
    input_shape = (args.in_channels, args.img_size, args.img_size)
    macs = count_macs(model, input_shape)
    plots = []
    if args.plot:
        try:
            plots = plot_genotype(genotype, args.plot)
        except OSError as error:
            raise TnasError(f"--plot {args.plot}: cannot write diagrams: {error.strerror or error}") from None

    if args.json:
        print(json.dumps({
            "genotype": genotype.to_dict(),
            "parameters": parameters,
            **macs,
            "config": {"n_way": args.n_way, "C": args.C, "layers": args.layers, "img_size": args.img_size,
                       "in_channels": args.in_channels},
            "plots": plots,
        }))
        return 0
    print(f"genotype: {args.genotype}")
    print("  " + format_cell(genotype, "normal"))
    print("  " + format_cell(genotype, "reduce"))
    print(f"  json: {genotype.to_json()}")
    print(f"network: {args.n_way}-way, C {args.C}, layers {args.layers}, input "
          f"{args.in_channels}x{args.img_size}x{args.img_size}")
    print(f"parameters: {parameters:,} ({human(parameters)})")
    print(f"MACs: {macs['macs']:,} ({human(macs['macs'])}) per image, by {macs['macs_source']}; "
          f"convolutions + linear alone: {macs['macs_conv_linear']:,} ({human(macs['macs_conv_linear'])})")
    for path in plots:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    cli_entry(main)
