"""Baselines beside hift, the harness that compares them, and its plots (see compare.py)."""
