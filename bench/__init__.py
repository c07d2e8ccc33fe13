"""Benchmarks: ``python -m bench`` (or ``make bench``) runs every module in BENCHMARKS.

Each benchmark module has a docstring (its title) and ``run() -> dict[str, object]``
returning its figures; it starts whatever it needs (servers, subprocesses) and stops it.
Absolute figures drift between machines and runs: compare things measured in one run.
"""
