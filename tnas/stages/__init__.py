"""Stage runners: what each command-line script does, as library calls (search, train, evaluate, decode, protocol).

Each stage module has typed settings (``search.SearchSettings``, ``train.TrainSettings``, ...),
``run(settings)`` (returns the summary it also writes as JSON in ``settings.run.out``),
``build_parser`` and ``settings_from_args``; the scripts only parse flags and call ``run``.
From Python, start from the defaults and change flags by name::

    from tnas.stages import train
    settings = train.TrainSettings(genotype="auto_maml_1shot").replace(img_size=16, C=4, layers=1, out="runs/t")
    summary = train.run(settings)                     # also runs/t/train.json, best.pt, last.pt

:func:`tnas.stages.restore.learner_from_checkpoint` rebuilds the learner of any stage's checkpoint.
"""
