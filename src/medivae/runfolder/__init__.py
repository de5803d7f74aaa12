"""A run folder: its config, opening it, its results.json and metrics.jsonl, and the lock on it."""
