"""Built-in experiment loggers: TensorBoard and MLflow (each an optional extra)."""
