"""Built-in heads, one per module."""
