"""Records, prompts, SFT tokenisation and partitioning."""
