"""Measured figures, each recorded with the machine, the commit and the config (``harness``).

Run from the repository root: ``python -m benchmarks.<name> --help``. The GPU pre-flight is a
command of the package (``python -m deepscaler.gpu_check``); the trials and the mutation check
are with the tests (``pytest -m trial``, ``python -m tests.mutants``).
"""
