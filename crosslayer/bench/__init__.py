"""Benchmarks that warm up, synchronise, repeat, and return one result dict (the CLI prints it as a table + JSON)."""
