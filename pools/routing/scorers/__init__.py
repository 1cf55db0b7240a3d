"""Scorers: rate each candidate replica in [0, 1]."""
