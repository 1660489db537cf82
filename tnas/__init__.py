"""tnas: T-NAS and auto-MAML (fast adaptation of neural architectures with meta learning).

Layers, arrows pointing down (see README): scripts -> engine / evaluate -> meta ->
models / visualize -> genotypes, ops, data, config, runlog.
"""
__version__ = "0.1.0"
