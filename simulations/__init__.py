"""Synthetic multi-site federations and the local simulation driver."""
