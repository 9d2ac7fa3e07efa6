"""Benchmarks and load tests for mriseg-serve (not part of the installed package)."""
