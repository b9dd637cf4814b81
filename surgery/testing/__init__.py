"""Fixtures for tests and demos: pretrained-like weights, Keras 1 files, legacy VGG16 weights files. Not used at run time."""
