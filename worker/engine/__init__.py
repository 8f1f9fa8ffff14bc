"""The training engine: features, targets, the MLP maths, checkpoints and the ``Trainer``.

Pure computation apart from ``trainer``, which drives the store; nothing here imports Celery.
"""
