"""Micro-benchmarks (run as modules, e.g. ``python -m simulations.bench.aggregation``)."""
