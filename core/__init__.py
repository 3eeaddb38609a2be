"""Shared infrastructure: typed params, dataset readers, atomic output."""
