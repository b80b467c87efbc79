"""Benchmarks: each script writes JSON (results/) and a readable table. Run as modules: python -m bench.speedup."""
