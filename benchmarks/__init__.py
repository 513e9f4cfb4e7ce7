"""Benchmark scripts (`python -m benchmarks.NAME`) and their recorded results."""
