"""Figures of a run or a model, built with matplotlib's object-oriented API (no pyplot)."""
