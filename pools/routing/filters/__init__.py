"""Filters: drop replicas that must not take a call."""
