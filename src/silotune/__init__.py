"""silotune: fine-tune language models on private data that stays in its silos."""

__version__ = "0.1.0"
