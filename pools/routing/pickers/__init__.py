"""Pickers: choose one replica from the scored candidates."""
