"""Training: model building, the loop, checkpoints, evaluation and merging."""
