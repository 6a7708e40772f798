"""Held-out evaluation: loss, perplexity and ROUGE-L of greedy generations."""
