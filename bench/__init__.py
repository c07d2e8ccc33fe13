"""Benchmarks: ``python -m bench`` (``make bench``) runs every module in BENCHMARKS.

Each benchmark module has a docstring (its title) and ``run() -> dict[str, object]``
returning its figures; it starts whatever it needs (servers, subprocesses) and stops it.
Besides plain figures (printed as they are) the dict may hold ``"rows"`` (a list of
:class:`bench.common.Row`: the table's lines, each a longdl figure with its baseline
measured in the same run and its target), ``"plots"`` (:class:`bench.common.Plot`) and
``"profile"`` (markdown). Absolute figures drift between machines and runs: compare
things measured in one run.
"""
