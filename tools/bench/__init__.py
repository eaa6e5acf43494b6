"""The benchmark package behind tools/bench/benchmark.py (see its docstring)."""
