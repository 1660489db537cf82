"""Meta-learning: the functional MAML core and the learners built on it (T-NAS, auto-MAML, MAML / MAML++).

>>> from tnas.meta import inner_loop, model_forward                  # the functional core, any nn.Module
>>> from tnas.meta import MAMLPlusPlus, MAMLConfig                   # MAML / MAML++ of a fixed network
>>> from tnas.meta import TNAS, TNASConfig, AutoMAML, AutoMAMLConfig  # search learners over a Supernet

Every learner is a :class:`MetaLearner`: ``meta_step(batch)`` (one outer update on an
``EpisodeBatch`` of T tasks), ``evaluate(batch, steps)`` (adapt, then score the query sets)
and ``adapt(support_x [T, N, C, H, W], support_y [T, N])``; each returns per-task tensors
(:class:`StepStats`, ``.summary()`` for printable means). Batches and model must share device
and dtype. :mod:`tnas.meta.genotype_batch` trains G genotypes at once, :mod:`tnas.meta.cuda_graph`
replays steps as CUDA graphs.
"""
from tnas.meta.auto_maml import AutoMAML, AutoMAMLConfig
from tnas.meta.learner import MetaLearner, StepStats
from tnas.meta.maml import InnerLoopResult, inner_loop, model_forward, query_loss_and_accuracy
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig

__all__ = ["AutoMAML", "AutoMAMLConfig", "MetaLearner", "StepStats", "InnerLoopResult", "inner_loop",
           "model_forward", "query_loss_and_accuracy", "MAMLConfig", "MAMLPlusPlus", "TNAS", "TNASConfig"]
