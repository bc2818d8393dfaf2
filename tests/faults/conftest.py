"""Marks this package's tests ``faults`` and gives each a ``fault_report`` to record figures."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.report import Figures, append

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Iterator[Figures]:
    """Figures of this test, written to the report only if the test passed."""
    figures = Figures(test=request.node.nodeid.split("::", 1)[-1], module=request.node.path.stem)
    started = time.monotonic()
    yield figures
    figures.seconds = round(time.monotonic() - started, 1)
    report = getattr(request.node, "rep_call", None)
    figures.passed = bool(report is not None and report.passed)
    append(figures)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
