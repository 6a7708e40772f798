"""Privacy defences: Flower's differential-privacy wrappers for federated runs, and noise on
what a split client sends to its server. Attacks never import this package."""
