"""Benchmarks behind BENCHMARKS.md: `make bench` runs them all (bench/run.py) and writes bench/results.json."""
