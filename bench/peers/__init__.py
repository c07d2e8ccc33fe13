"""The stacks longdl is measured against, each run as its own process by a benchmark.

Each is what a competent user would write with that stack, no more: a baseline that
does less than longdl (no durability, no middleware) shows the ceiling, one that does
the same (FastAPI + arq + Redis) shows the alternative.
"""
