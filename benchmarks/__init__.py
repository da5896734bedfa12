"""fastpfc benchmarks: ``pytest benchmarks --benchmark-only`` and ``python -m benchmarks.report``."""
