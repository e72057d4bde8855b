"""Benchmarks: `iro bench` (guided decoding performance) and `python -m bench.load` (load test)."""
