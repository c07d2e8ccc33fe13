"""Run the benchmarks: ``python -m bench`` (all, writes docs/benchmarks.md), ``--quick``
(P1, P2, P5: prints the table only), or named ones: ``python -m bench status held``."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence

#: Benchmark modules of a full run, in this order.
BENCHMARKS = (
    "bench.status",
    "bench.instructions",
    "bench.initiate",
    "bench.jobs_e2e",
    "bench.held",
    "bench.bundle_local",
    "bench.bundle_s3",
    "bench.bundle_memory",
    "bench.postgres",
    "bench.profile",
)
#: ``--quick``: P1, P2 and P5, in under two minutes.
QUICK = ("bench.status", "bench.initiate", "bench.bundle_local")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so every benchmark's finally stops its servers.
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmark modules (default: all)")
    parser.add_argument("--quick", action="store_true", help="P1, P2, P5 with short runs")
    parser.add_argument(
        "--report", action="store_true", help="write docs/benchmarks.md even for a partial run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"
    signal.signal(signal.SIGTERM, _terminate)

    from bench import common, report

    common.raise_fd_limit()
    if args.names:
        names = [name if "." in name else f"bench.{name}" for name in args.names]
    else:
        names = list(QUICK if args.quick else BENCHMARKS)
    loads = [" ".join(f"{x:.1f}" for x in os.getloadavg())]
    started = time.time()
    outcomes: list[report.Outcome] = []
    for name in names:
        module = importlib.import_module(name)
        title = (module.__doc__ or name).strip().splitlines()[0]
        print(f"== {name}: {title}", flush=True)
        begun = time.monotonic()
        try:
            results = module.run()
        except Exception:
            traceback.print_exc()
            outcome = report.Outcome(name, title, time.monotonic() - begun)
            outcome.error = traceback.format_exc()
            print(f"   FAILED after {outcome.seconds:.1f} s", flush=True)
            outcomes.append(outcome)
            continue
        figures, rows, plots, profile = report.split(results)
        outcome = report.Outcome(
            name, title, time.monotonic() - begun, figures, rows, plots, profile
        )
        outcomes.append(outcome)
        for key, value in figures.items():
            print(f"   {key}: {value}", flush=True)
        if profile:
            print("   " + profile.replace("\n", "\n   "), flush=True)
        print(f"   ({outcome.seconds:.1f} s)", flush=True)
    finished = time.time()
    loads.append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
    rows = report.rows_of(outcomes)
    print(
        f"\n== {len(rows)} figures in {(finished - started) / 60:.1f} min "
        f"(load average {loads[0]} -> {loads[1]})"
    )
    for line in report.table_lines(rows):
        print(line)
    if args.report or (not args.names and not args.quick):
        report.write(outcomes, started, finished, loads)
        print(f"\nwrote {report.REPORT.relative_to(common.ROOT)}")
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
