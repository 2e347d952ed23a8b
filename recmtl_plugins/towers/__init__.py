"""Built-in towers, one per module."""
