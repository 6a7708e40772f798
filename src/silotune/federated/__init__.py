"""Federated instruction tuning on Flower: the thin apps and the algorithms they run."""
