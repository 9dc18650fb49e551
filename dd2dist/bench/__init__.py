"""Benchmarks run by ``jobs/benchmark.py``: the exact one-step check (toy) and the training benchmark (train)."""
