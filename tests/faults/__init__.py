"""The fault-injection suite (``make faults``): real processes killed, stalled and starved.

Every test here is marked ``faults`` (by this package's conftest) and left out of a plain
``pytest`` run. Each records what it injected and what it checked with the ``fault_report``
fixture; ``python -m tests.faults.report`` prints the table that docs/reliability.md holds.
"""
