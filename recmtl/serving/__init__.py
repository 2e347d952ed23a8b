"""Scoring and serving an exported ONNX model: onnxruntime, pyarrow and numpy only (no torch, pandas or config)."""
