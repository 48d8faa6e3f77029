"""Benchmarks of apimart-batch against its bound, a naive client and a parsing floor (issue 15).

Run from the repository root: ``python -m bench`` (the full set, about half an hour on two
cores) or ``python -m bench --quick`` (small N, one run each: a smoke test of the harness).
Nothing here is imported by ``runner`` or collected by pytest; the figures land in
``BENCHMARKS.md`` and ``BENCHMARKS.json``.
"""
