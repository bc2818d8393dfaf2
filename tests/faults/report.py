"""The fault suite's figures: one JSON line per test in ``FAULTS_REPORT``, and a table of them.

``python -m tests.faults.report [PATH]`` prints the Markdown table for docs/reliability.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import msgspec

DEFAULT = Path(__file__).resolve().parents[2] / ".faults" / "report.jsonl"


class Figures(msgspec.Struct, kw_only=True):
    """What one test injected and what it found: the row docs/reliability.md shows."""

    test: str
    module: str
    fault: str = ""
    """How the fault was injected, e.g. "SIGKILL of a worker at a random moment"."""
    injected: int = 0
    survived: int = 0
    """Injections after which every check held."""
    lost: int = 0
    """Acknowledged records (commits, appends) missing afterwards."""
    checked: str = ""
    """What was compared, e.g. "Redis equals the pure fold of the log"."""
    detail: dict[str, int | float | str] = msgspec.field(default_factory=dict)
    seconds: float = 0.0
    passed: bool = False


def path() -> Path:
    return Path(os.environ.get("FAULTS_REPORT") or DEFAULT)


def append(figures: Figures) -> None:
    target = path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("ab") as out:
        out.write(msgspec.json.encode(figures) + b"\n")


def load(source: Path) -> list[Figures]:
    lines = source.read_bytes().splitlines() if source.exists() else []
    return [msgspec.json.decode(line, type=Figures) for line in lines if line.strip()]


def table(rows: list[Figures]) -> str:
    head = "| test | fault | injected | survived | lost | checked | s | passed |\n"
    head += "|---|---|--:|--:|--:|---|--:|---|\n"
    body = "".join(
        f"| `{r.module}::{r.test}` | {r.fault} | {r.injected} | {r.survived} | {r.lost} "
        f"| {r.checked} | {r.seconds:.0f} | {'yes' if r.passed else 'NO'} |\n"
        for r in rows
    )
    return head + body


if __name__ == "__main__":
    rows = load(Path(sys.argv[1]) if len(sys.argv) > 1 else path())
    sys.stdout.write(table(rows))
    injected = sum(r.injected for r in rows)
    lost = sum(r.lost for r in rows)
    sys.stdout.write(f"\n{len(rows)} tests, {injected} faults injected, {lost} records lost\n")
