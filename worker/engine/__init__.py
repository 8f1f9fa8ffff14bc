"""The training engine: features, targets, the MLP maths, checkpoints, the online evaluation, the
guard's rule and a batch's phases (``batch``).

Pure computation: nothing here imports Redis, Celery, the store (``worker.store``) or the training
loop that drives it (``worker.training``); ``tests/unit/test_layers.py`` keeps it so.
"""
