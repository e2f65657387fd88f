"""Benchmarks of positiond against the seed's in-process design: ``python -m bench --help``."""
