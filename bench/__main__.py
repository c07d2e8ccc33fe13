"""Run the benchmarks listed in BENCHMARKS, or those named: ``python -m bench bundle_memory``."""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections.abc import Sequence

#: Benchmark modules, run in this order.
BENCHMARKS = ("bench.poll_throughput", "bench.idle_connections", "bench.bundle_memory")


def main(argv: Sequence[str]) -> int:
    names = [name if "." in name else f"bench.{name}" for name in argv] or list(BENCHMARKS)
    failed = 0
    for name in names:
        module = importlib.import_module(name)
        title = (module.__doc__ or name).strip().splitlines()[0]
        print(f"== {name}: {title}", flush=True)
        started = time.monotonic()
        try:
            results = module.run()
        except Exception:
            failed += 1
            traceback.print_exc()
            print(f"   FAILED after {time.monotonic() - started:.1f} s", flush=True)
            continue
        for key, value in results.items():
            print(f"   {key}: {value}", flush=True)
        print(f"   ({time.monotonic() - started:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
