"""Meta-learning: functional MAML core, T-NAS, auto-MAML, MAML++."""
