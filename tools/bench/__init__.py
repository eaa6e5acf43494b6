"""The benchmark package behind tools/benchmark.py (see its docstring)."""
