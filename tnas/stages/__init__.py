"""Stage runners: what each command-line script does, as library calls (search, train, evaluate).

Scripts only parse arguments and call ``run(args)`` of one of these modules, so a notebook
can run a stage with a plain ``argparse.Namespace`` or dict too.
"""
