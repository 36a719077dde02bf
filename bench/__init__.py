"""Benchmarks: `relay bench …` (docs/BENCHMARKS.md)."""
