"""Benchmarks run by ``jobs/benchmark.py``: the exact one-step check (toy), the training benchmark (train), the data
benchmark (data) and the checkpoint-manifest cost (checkpoint_manifest)."""
