"""Decode + fold in plain Python against msgspec decode alone.

Records (the log's msgpack events: creates, then commits of three consumers) are built in
memory, not timed. Timed, one after the other in each repeat:

* ``decode``: ``tracker.events.decode_event`` (how the projector reads the log), the ceiling;
* ``decode_strict``: the validating decoder (every constraint checked again);
* ``decode_fold_batch``: decode + ``fold_batch`` (the projector's path), the headline;
* ``decode_fold_all``: decode + ``fold_all`` (the pure per-session fold ``verify`` uses).

Baseline the design started from: ~2.2 M events/s decode, ~0.95 M events/s decode + fold.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchmarks._common import (
    CONSUMERS,
    EPOCH,
    Workload,
    commit_events,
    emit,
    log,
    median,
    parser,
    rate_summary,
    timed,
)
from tracker.events import decode_event, decode_event_strict, encode_event
from tracker.fold import fold_all, fold_batch

REFERENCE_DECODE = 2_200_000.0
REFERENCE_DECODE_FOLD = 950_000.0


def main() -> None:
    p = parser("Decode + fold in plain Python vs msgspec decode alone.")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--sessions", type=int, default=10_000)
    args = p.parse_args()

    workload = Workload(args.seed, args.sessions)
    records = list(map(encode_event, workload.creates()))
    while len(records) < args.events:
        n = min(10_000, args.events - len(records))
        at = EPOCH + timedelta(seconds=len(records) // 10_000)
        records.extend(map(encode_event, commit_events(workload.commits(n), at)))
    log(f"{len(records)} records in memory ({sum(map(len, records)) / len(records):.0f} B avg)")

    cases: dict[str, Callable[[], object]] = {
        "decode": lambda: list(map(decode_event, records)),
        "decode_strict": lambda: list(map(decode_event_strict, records)),
        "decode_fold_batch": lambda: fold_batch(map(decode_event, records)),
        "decode_fold_all": lambda: fold_all(map(decode_event, records)),
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    ratios: list[float] = []
    for i in range(args.repeat):
        for name, case in cases.items():
            elapsed, result = timed(case)
            del result
            seconds[name].append(elapsed)
        ratios.append(seconds["decode"][-1] / seconds["decode_fold_batch"][-1])
        log(
            f"repeat {i + 1}/{args.repeat}: "
            + ", ".join(f"{name} {len(records) / s[-1]:,.0f}/s" for name, s in seconds.items())
        )
    n = len(records)
    rates: dict[str, dict[str, Any]] = {
        name: {**rate_summary(n, s), "unit": "events/s"} for name, s in seconds.items()
    }
    rate = float(rates["decode_fold_batch"]["median_rate"])
    emit(
        {
            "bench": "fold",
            "params": {
                "events": n,
                "sessions": args.sessions,
                "consumers": list(CONSUMERS),
                "titles": workload.describe_titles(),
                "repeat": args.repeat,
                "seed": args.seed,
            },
            "seconds": rates["decode_fold_batch"]["seconds"],
            "median_rate": rate,
            "value": rate,
            "unit": "events/s",
            "target": None,
            "meets_target": None,
            "reference": {
                "design_decode": REFERENCE_DECODE,
                "design_decode_fold": REFERENCE_DECODE_FOLD,
            },
            "ratio": round(median(ratios), 3),
            "ratio_of": "decode+fold_batch rate / decode rate (median of per-repeat ratios)",
            "ceiling": {"decode": rates["decode"]},
            "cases": rates,
        }
    )


if __name__ == "__main__":
    main()
