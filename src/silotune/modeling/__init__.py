"""Base models (loading, caching) and named PEFT adapters."""
