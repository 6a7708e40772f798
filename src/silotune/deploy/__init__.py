"""Running federated algorithms on Flower's Deployment Engine (SuperLink + SuperNodes)."""
