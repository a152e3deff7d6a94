"""The training stack: models, tfds input, the per-device step, the host loop, run directories."""
