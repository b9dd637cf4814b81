"""Benchmarks for `surgery`: each figure is a ratio measured in one run.

Run `python -m benchmarks` (or `python benchmarks/run.py`); see README.md.
"""

import os

# Before anything imports keras (every submodule imports this package first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
