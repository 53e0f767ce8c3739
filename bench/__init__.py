"""metaproxy benchmarks: reproducible tables for the fronts, memory, full path and boot storm.

Run `bench/run --help` (or `python -m bench --help` from the repository root). Not timed tests.
"""
