"""Benchmarks of cpu_tracker: ``./run.sh bench`` (``python -m tests.bench``). See __main__.py."""
