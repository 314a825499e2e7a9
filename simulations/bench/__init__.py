"""Micro-benchmarks (run as modules, e.g. ``python -m fedmira.simulations.bench.aggregation``)."""
