"""LongBench v1, LongBench-E and MiniLongBench (specs/benchmarks.md §A)."""
