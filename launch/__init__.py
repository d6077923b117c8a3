"""Launching runs: the multitune CLI, and (later) accelerate and SLURM launchers."""
