#!/usr/bin/env python
"""The T-NAS paper's main table from your own run: MAML (Conv-4), auto-MAML, T-NAS, T-NAS++ at 5-way 1/5-shot.

    python scripts/reproduce.py --demo                                   # glyphs demo, CPU, minutes
    python scripts/reproduce.py --data_path ~/data/mini-imagenet --out runs/reproduce --device cuda
    python scripts/reproduce.py --data_path DIR --budget --shots 1 --methods maml,auto_maml

Runs, in order and resumably (a rerun skips finished steps and continues interrupted ones, and
redoes a step whose upstream was redone since it ran: see tnas/reproduce/runner.py),
each stage script with the presets the plan names (configs/reproduce_paper.yaml, or
configs/reproduce_demo.yaml with --demo), and writes OUT/table.md and OUT/table.json.
"""
import argparse
import os
import shlex
import sys

from tnas.config import HelpFormatter, parse_flags
from tnas.errors import TnasError, cli_entry

PAPER_PLAN = "configs/reproduce_paper.yaml"
DEMO_PLAN = "configs/reproduce_demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Reproduce the T-NAS paper's main table (MAML with Conv-4, auto-MAML, T-NAS, T-NAS++; "
                    "mean and 95% CI over fixed test tasks) into OUT/table.md and OUT/table.json.",
        formatter_class=HelpFormatter)
    parser.add_argument("--data_path", default=None, metavar="DIR",
                        help="the mini-ImageNet directory (required unless --demo or --plan)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where every run and the table go (default: runs/reproduce[_budget] or "
                             "runs/reproduce_demo)")
    parser.add_argument("--shots", default=None, metavar="1,5",
                        help="shots (K of N-way K-shot) to run, comma-separated (default: the plan's, 1,5)")
    parser.add_argument("--methods", default="maml,auto_maml,tnas,tnas++", metavar="LIST",
                        help="rows to run, comma-separated, of maml,auto_maml,tnas,tnas++")
    parser.add_argument("--budget", action="store_true",
                        help="short schedules (the plan's budget: search and from-scratch epochs cut, the "
                             "protocol's --budget); marked as such in the table")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: each preset's)")
    parser.add_argument("--cache_dir", default=None, metavar="DIR", help="decoded dataset cache (default: the stages')")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per search, training and protocol step, under torchrun (data-parallel "
                             "meta-batches; the protocol deals its genotypes to them)")
    parser.add_argument("--demo", action="store_true", help=f"the embedded glyphs demo ({DEMO_PLAN})")
    parser.add_argument("--plan", default=None, metavar="YAML", help=f"plan file (default: {PAPER_PLAN})")
    parser.add_argument("--dry_run", action="store_true",
                        help="print each step's state and command line and the table as it stands; run and "
                             "write nothing")
    return parser


def main(argv=None):
    from tnas.reproduce import plan as plans
    from tnas.reproduce import runner
    from tnas.reproduce.table import render_markdown

    args = parse_flags(build_parser(), argv)
    if args.nproc < 1:
        raise TnasError(f"--nproc must be >= 1, got {args.nproc}")
    plan_path = args.plan or (DEMO_PLAN if args.demo else PAPER_PLAN)
    if not os.path.isfile(plan_path) and os.path.isfile(os.path.join(plans.REPO, plan_path)):
        plan_path = os.path.join(plans.REPO, plan_path)  # configs/... from any directory
    if args.plan is None and not args.demo and not args.data_path:
        raise TnasError("--data_path DIR is required for the paper's table (mini-ImageNet); --demo runs the "
                        "embedded glyphs demo instead")
    plan = plans.load_plan(plan_path)
    shots = plans.parse_shots(args.shots) if args.shots else plan.shots
    methods = plans.parse_methods(args.methods)
    default_out = "runs/reproduce_demo" if args.demo else "runs/reproduce" + ("_budget" if args.budget else "")
    out = os.path.abspath(args.out or os.path.join(plans.REPO, default_out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise TnasError(f"--out {out} is a file, not a directory")
    data_path = os.path.abspath(os.path.expanduser(args.data_path)) if args.data_path else None
    if data_path and not os.path.isdir(data_path):
        raise TnasError(f"--data_path {args.data_path}: no such directory")
    settings = plans.Settings(out=out, shots=shots, methods=methods, budget=args.budget, device=args.device,
                              data_path=data_path, cache_dir=args.cache_dir)
    steps, cells = plans.build_steps(plan, settings)
    meta = {
        "title": plan.title + (" (budget: short schedules)" if args.budget else ""),
        "paper": plan.paper, "dataset": plan.dataset, "n_way": 5, "budget": args.budget,
        "commit": runner.source_version(),
        "command": "scripts/reproduce.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                               else sys.argv[1:])),
        "nproc": args.nproc,
        "settings": {"plan": os.path.relpath(plan.path, plans.REPO), "shots": list(shots), "methods": list(methods),
                     "budget": args.budget, "budget_schedules": plan.budget if args.budget else None,
                     "evaluate": plan.evaluate, "device": args.device, "data_path": data_path, "nproc": args.nproc,
                     "presets": plan.presets},
    }
    if args.dry_run:
        ledger = runner.Ledger(out)
        states = runner.step_states(steps, ledger)
        for step in steps:
            state = states[step.name]  # a stale step starts anew
            command = runner.step_command(step, "new" if state.startswith("stale") else state, args.nproc, "python")
            print(f"{step.name}: {state}: {' '.join(command)}")
        print()
        print(render_markdown(runner.current_table(steps, cells, ledger, meta)), end="")
        return
    try:
        runner.run_pipeline(plan, settings, steps, cells, meta, nproc=args.nproc)
    except runner.Interrupted as error:
        print(f"reproduce: interrupted ({error}); the running stage saved its checkpoint; rerun the same command "
              f"to continue", file=sys.stderr)
        sys.exit(130)
    print(open(os.path.join(out, "table.md"), encoding="utf-8").read())


if __name__ == "__main__":
    cli_entry(main)
