"""Benchmarks: the official-FinerCut PyTorch baseline and the comparisons against it."""
