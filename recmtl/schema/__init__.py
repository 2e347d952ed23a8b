"""The feature schema: column transforms (``columns``), labels (``labels``), the fitted schema and its
persistence (``fitted``), and the fit pass over the training data with its leak check (``fit``, ``leaks``)."""
from __future__ import annotations

from recmtl.schema.columns import CategoricalColumn, DenseColumn, ImageColumn, SequenceColumn, TextColumn
from recmtl.schema.fit import check_types, fit_schema
from recmtl.schema.fitted import SCHEMA_VERSION, Arrays, FittedSchema
from recmtl.schema.labels import LabelColumn
from recmtl.schema.leaks import check_leaks

__all__ = ["SCHEMA_VERSION", "Arrays", "CategoricalColumn", "DenseColumn", "FittedSchema", "ImageColumn", "LabelColumn",
           "SequenceColumn", "TextColumn", "check_leaks", "check_types", "fit_schema"]
