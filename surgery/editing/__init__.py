"""Edits of a model's structure: layers deleted, inserted, replaced, deepened."""
