"""One command for the paper's table (``scripts/reproduce.py``, ``reproduce_paper.sh``).

:mod:`~tnas.reproduce.plan` turns a plan file (which preset each stage uses) into the steps
of each table cell; :mod:`~tnas.reproduce.runner` runs them in order through the stage
scripts, skipping finished steps and resuming interrupted ones, and redoing a step made from an
earlier output of the step it reads (:mod:`~tnas.reproduce.freshness`); :mod:`~tnas.reproduce.table`
builds ``table.json`` / ``table.md`` from what the steps wrote.
"""
