"""recmtl's built-in plugins. Each module registers itself through the ``recmtl`` entry-point group,
exactly as a third-party plugin package would."""
