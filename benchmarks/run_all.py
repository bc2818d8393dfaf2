"""Run every benchmark case in its own process; one JSON line per case on stdout.

``python -m benchmarks.run_all [--only replay,commit] [--quick] [--check]``

Each case's logs go to stderr as they come; a summary table follows on stderr. The exit
status is 1 if a case failed to run (or, with ``--check``, missed its target).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = (
    "replay",
    "commit_async",
    "commit",
    "latency",
    "get",
    "memory",
    "fold",
    "kafka_append",
    "kafka_replay",
    "kafka_delay",
    "worker_file",
    "worker_kafka",
    "worker_delay",
    "api",
)

QUICK: dict[str, list[str]] = {
    "replay": ["--events", "300000", "--repeat", "1"],
    "commit_async": ["--commits", "300000", "--repeat", "1"],
    "commit": ["--commits", "100000", "--repeat", "1"],
    "latency": ["--ops", "2000", "--warmup", "200", "--repeat", "1"],
    "get": ["--gets", "5000", "--repeat", "1"],
    "memory": ["--secondary-sessions", "10000"],
    "fold": ["--events", "200000", "--repeat", "1"],
    "kafka_append": ["--calls", "24", "--repeat", "1"],
    "kafka_replay": ["--events", "200000", "--repeat", "1"],
    "kafka_delay": ["--seconds", "5", "--warmup", "1", "--raw-seconds", "3"],
    "worker_file": ["--messages", "200000", "--repeat", "1"],
    "worker_kafka": ["--messages", "30000", "--repeat", "1"],
    "worker_delay": ["--seconds", "5", "--warmup", "1", "--direct-seconds", "3"],
    "api": ["--sessions", "2000", "--seconds", "3", "--warmup", "1"],
}


def run_case(name: str, extra: list[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run one case; its JSON result (or an error record) and the wall seconds it took."""
    argv = [sys.executable, "-m", f"benchmarks.bench_{name}", *extra]
    print(f"== {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with subprocess.Popen(
        argv,
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # the case stops its redis-server on SIGTERM
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
            return {"bench": name, "error": f"timed out after {timeout:.0f}s"}, timeout
    elapsed = time.perf_counter() - started
    lines = [line for line in stdout.splitlines() if line.strip()]
    if process.returncode != 0 or not lines:
        return {"bench": name, "error": f"exit status {process.returncode}"}, elapsed
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except ValueError as exc:
        return {"bench": name, "error": f"not JSON: {exc}"}, elapsed
    return result, elapsed


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items() if k != "is")
    return "-" if value is None else str(value)


def table(rows: list[tuple[dict[str, Any], float]]) -> str:
    header = ("case", "value", "unit", "target", "met", "ratio", "wall s")
    body = []
    for result, elapsed in rows:
        if "error" in result:
            body.append(
                (result["bench"], "ERROR", str(result["error"]), "", "", "", f"{elapsed:.0f}")
            )
            continue
        body.append(
            (
                str(result.get("bench")),
                fmt(result.get("value")),
                str(result.get("unit", "")),
                fmt(result.get("target")),
                {True: "yes", False: "NO", None: "-"}[result.get("meets_target")],
                f"{result['ratio']:.3f}" if isinstance(result.get("ratio"), float) else "-",
                f"{elapsed:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in (header, *body)]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description="Run every benchmark case, one process each.")
    p.add_argument("--only", default=",".join(CASES), help="comma-separated cases")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows = []
    for name in names:
        result, elapsed = run_case(name, QUICK[name] if args.quick else [], args.timeout)
        print(json.dumps(result), flush=True)
        rows.append((result, elapsed))
    print("\n" + table(rows), file=sys.stderr, flush=True)
    failed = any("error" in r for r, _ in rows)
    missed = any(r.get("meets_target") is False for r, _ in rows)
    sys.exit(1 if failed or (args.check and missed) else 0)


if __name__ == "__main__":
    main()
