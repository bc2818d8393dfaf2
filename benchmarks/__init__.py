"""Benchmarks: one case per module, ``python -m benchmarks.bench_<case>`` prints one JSON line.

Each case measures, in the same run, the ceiling it is compared against, so that a
noisy machine still gives a meaningful ratio. ``python -m benchmarks.run_all`` runs
every case in its own process. Not collected by pytest (outside ``testpaths``).
"""
