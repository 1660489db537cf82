"""tnas: T-NAS and auto-MAML (fast adaptation of neural architectures with meta learning).

Where things are, for use from Python (README: "Use from Python"):

- :mod:`tnas.data`: ``load_split``, ``EpisodeSampler``, ``FixedEpisodes`` (batches of T tasks);
- :mod:`tnas.genotypes`: ``Genotype``, ``PUBLISHED``, ``resolve_genotype``, ``decode_genotype``, JSON I/O;
- :mod:`tnas.models`: ``Network`` (a genotype's network), ``Supernet``, ``Conv4``, ``count_macs``;
- :mod:`tnas.meta`: ``inner_loop`` / ``model_forward`` (functional MAML), the learners
  ``MAMLPlusPlus`` / ``TNAS`` / ``AutoMAML`` and their configs;
- :mod:`tnas.evaluate`: ``evaluate_episodes``, ``mean_ci95`` (accuracy and 95% CI on fixed episodes);
- :mod:`tnas.visualize`: ``plot_genotype`` (cell diagrams); :mod:`tnas.stages`: each stage as ``run(settings)``;
- :mod:`tnas.checkpoints`: ``load_checkpoint`` (any tnas checkpoint, without running code; ``read_checkpoint``
  also gives the SHA-256 of the bytes read).

Imports point down only (docs/design.md section 2; tests/test_layout.py checks every one): scripts ->
stages, reproduce -> the run layer (engine, evaluate, runlog, config, checkpoints, visualize, ...) -> meta ->
models, ops, task_folding -> genotypes; meta also reads data. Models and meta-learning know nothing of runs
and files, data nothing of models; data, genotypes and the run layer write through files, errors is at the
bottom.
"""
__version__ = "0.1.0"
