"""Where a real ``longdl serve`` spends its time under wrk: py-spy on P1 and P2.

The server runs under ``py-spy record`` (sampling from outside at 200 Hz, all threads,
idle ones left out; it pauses the process for each sample, since without that some
stacks come out truncated) while wrk polls a running job's status
(P1) or posts initiates (P2) for ``PROFILE_S`` seconds. The collapsed stacks are
reduced to three views per figure: where samples were taken (leaf function, "self"),
which longdl functions they were under ("inclusive"), and which package the leaf was
in. Start-up samples (imports) are left out. Samples in ``selectors`` are the event
loop waiting; SQLite's C code runs inside the store's functions, on the loop or on the
writer's thread (``_Writer._serve``). They guide the optimization work of issue 12;
they are not a target.
"""

from __future__ import annotations

import os
import shutil
import signal
import sysconfig
from collections import Counter
from pathlib import Path

from bench import common
from bench.common import Longdl

PROFILE_S = 8
FILES = (70000, 70007)
TOP = 12


def _py_spy() -> str:
    found = shutil.which(
        "py-spy", path=sysconfig.get_path("scripts") + os.pathsep + os.environ["PATH"]
    )
    if found is None:
        raise RuntimeError("py-spy is not installed (the [bench] extra installs it)")
    return found


def run() -> dict[str, object]:
    py_spy = _py_spy()
    sections: list[str] = []
    figures: dict[str, object] = {}
    with common.workdir() as tmp:
        script = common.post_script(tmp, "/v1/download/initiate", {"file_ids": list(FILES)})
        for key, title in (("P1", "status of a running job"), ("P2", "durable initiate")):
            out = tmp / f"{key}.txt"
            wrapper = [py_spy, "record", "--rate", "200", "--format", "raw", "--nolineno",
                       "--output", str(out), "--"]  # fmt: skip
            server = Longdl(tmp / f"data-{key}", common.stuck_settings(), wrapper=wrapper)
            server.seed(*FILES)
            try:
                server.start()
                running = server.initiate(FILES)
                server.wait_status(running, "running")
                if key == "P1":
                    result = common.wrk(server.url + running["statusUrl"], duration_s=PROFILE_S)
                else:
                    result = common.wrk(
                        server.url + "/v1/download/initiate", script=script, duration_s=PROFILE_S
                    )
                # Stop the server itself: py-spy writes its file once its target exits.
                os.kill(server.pid, signal.SIGTERM)
                assert server.child is not None
                server.child.proc.wait(60)
            finally:
                server.stop()
            if not out.exists():
                raise RuntimeError(
                    f"py-spy wrote nothing:\n{server.child and server.child.log_tail()}"
                )
            stacks = _read(out)
            samples = sum(stacks.values())
            figures[f"{key} samples"] = f"{samples:,} at {result.rps:,.0f} req/s under py-spy"
            sections.append(_summary(key, title, stacks, result.rps))
    return {**figures, "profile": "\n".join(sections)}


def _read(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: one ``frame;frame;...;leaf count`` line per distinct stack."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        # Start-up (imports) is not what wrk measures.
        if stack and count.isdigit() and "importlib._bootstrap" not in stack:
            stacks[tuple(_short(frame) for frame in stack.split(";"))] += int(count)
    return stacks


def _short(frame: str) -> str:
    """``f (/…/site-packages/aiohttp/web_protocol.py)`` -> ``f (aiohttp/web_protocol.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", str(common.ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


def _package(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    if where.startswith("longdl/"):
        return "/".join(where.split("/")[:2]).removesuffix(".py")
    if "/" in where:
        return where.split("/")[0]
    return where.removesuffix(".py") or "?"


def _summary(key: str, title: str, stacks: Counter[tuple[str, ...]], rps: float) -> str:
    total = sum(stacks.values()) or 1
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for stack, count in stacks.items():
        leaf[stack[-1]] += count
        packages[_package(stack[-1])] += count
        for frame in set(stack):
            if "(longdl/" in frame and not frame.endswith(("(longdl/cli.py)", "__main__.py)")):
                inclusive[frame] += count

    def table(counter: Counter[str], head: str) -> list[str]:
        lines = [f"| {head} | % of samples |", "|---|---|"]
        lines += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in counter.most_common(TOP)]
        return lines

    lines = [
        f"### {key}: {title} ({total:,} samples, {rps:,.0f} req/s under py-spy)",
        "",
        "Leaf package: "
        + ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in packages.most_common(8)),
        "",
        *table(leaf, "where the samples were (self)"),
        "",
        *table(inclusive, "longdl function on the stack (inclusive)"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    for name, value in run().items():
        print(f"{name}: {value}")
