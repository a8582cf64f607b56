"""Benchmarks of osteoscreen against references in the same run (not tests: nothing asserts a time)."""
