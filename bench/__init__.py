"""Benchmarks of the orchestrator against the physical limit of its database.

`python -m bench` (or `make bench`) runs every scenario, prints a table and writes
`bench/results/latest.json`. See `bench/README.md`.
"""
