"""Evaluation: sampling with each EMA and scoring against held-out data."""
