"""The suite's own plumbing: marked, left out of plain pytest, figures written and read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.report import Figures, append, load, table


def test_fault_tests_are_marked(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("faults") is not None


def test_figures_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULTS_REPORT", str(tmp_path / "report.jsonl"))
    append(Figures(test="a", module="m", fault="SIGKILL", injected=12, survived=12, passed=True))
    append(Figures(test="b", module="m", injected=3, survived=2, lost=1))
    rows = load(tmp_path / "report.jsonl")
    assert [(r.test, r.injected, r.lost, r.passed) for r in rows] == [
        ("a", 12, 0, True),
        ("b", 3, 1, False),
    ]
    assert "| `m::b` |  | 3 | 2 | 1 |  | 0 | NO |" in table(rows)
