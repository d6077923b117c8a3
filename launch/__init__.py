"""Launching runs: the multitune CLI, accelerate launch for multi-process strategies, SLURM jobs and sweeps."""
