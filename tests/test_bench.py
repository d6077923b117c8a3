"""The benchmark harness measures what it claims: packing efficiency arithmetic and the process-tree RSS sampler."""

from __future__ import annotations

import sys

import numpy as np

from bench import packing_efficiency as pe
from bench.common import run_measured


def test_padded_efficiency_is_real_over_padded_tokens():
    lengths = np.array([10, 30] * 8)  # any batch of 8 holds a 30: every sample is padded to 30
    assert pe.padded_efficiency(lengths) == lengths.sum() / (16 * 30)


def test_multitune_packs_a_long_tail_to_the_target():
    lengths = pe.long_tail_lengths(2048, n=3000)  # the TRL side runs in `make bench` only (importing TRL is slow)
    ours = pe.multitune_efficiency(lengths, 2048)
    assert ours >= 0.995
    assert 0.1 < pe.padded_efficiency(lengths) < ours


def test_peak_rss_counts_child_processes():
    """A child that spawns a grandchild holding 300 MB: the tree's peak must include it."""
    code = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(0.5)'])")
    measured = run_measured([sys.executable, "-c", code])
    assert measured.peak_rss_mb > 300
