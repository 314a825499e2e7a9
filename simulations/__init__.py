"""Simulation helpers: partitioning pooled reports into simulated hospitals (no Flower imports)."""
