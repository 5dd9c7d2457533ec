"""Benchmarks: ratios taken in one run (service vs raw model, batched vs unbatched). Results: docs/performance.md."""
