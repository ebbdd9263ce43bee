"""jaxkv benchmarks: ``python -m benchmarks.<suite> --out DIR`` (see benchmarks/README.md)."""
