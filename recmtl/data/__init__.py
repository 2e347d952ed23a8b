"""Parquet and Arrow: reading sources, Arrow <-> numpy views, images, sequences, CSV conversion and
splits, synthetic data sets and ``recmtl init``'s starter config. Imports no torch."""
