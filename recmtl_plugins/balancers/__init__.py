"""Built-in balancers, one per module."""
