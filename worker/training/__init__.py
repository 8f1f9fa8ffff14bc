"""The training loop under a model's lock: the I/O around the engine's pure phases."""
