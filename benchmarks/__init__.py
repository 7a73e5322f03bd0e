"""Benchmarks for zproc; each module exports ``run() -> list[dict]`` and prints when run."""
