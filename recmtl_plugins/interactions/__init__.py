"""Built-in feature-interaction blocks, one per module."""
