"""Privacy attacks that measure what a run leaks: extraction, membership inference, inversion."""
