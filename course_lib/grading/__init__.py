"""Graders of the exercise notebooks, one module per chapter (core: what they share)."""
