"""Operating a deployment: the loss plot (and, as they come, metrics and access roles)."""
