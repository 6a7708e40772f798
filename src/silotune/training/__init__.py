"""The local training loop every algorithm shares."""
