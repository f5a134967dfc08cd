"""Benchmarks: a load generator, the servers it compares, and the comparisons."""
