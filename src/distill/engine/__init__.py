"""The training engine: stages, the loop, evaluation, checkpoints, runs and comparisons."""
