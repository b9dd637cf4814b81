"""Fixtures for tests and demos: pretrained-like weights, Keras 1 files. Not used at run time."""
