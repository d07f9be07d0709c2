"""Throughput benchmarks (scripts; run from the repository root)."""
