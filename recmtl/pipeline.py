"""Parquet -> preprocessed numpy blocks -> shuffled minibatches of tensors, with bounded memory.

Shuffling is two-level: row groups are read in a random order each epoch, and rows are permuted inside
a buffer of ``shuffle_buffer`` rows. Peak memory is about ``shuffle_buffer + read_rows`` preprocessed
rows, whatever the data size.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from recmtl.data import ParquetSource
from recmtl.schema import Arrays, FittedSchema


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    mask: torch.Tensor | None
    group: np.ndarray | None
    rows: int


def to_batch(arrays: Arrays) -> Batch:
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return Batch({k: t(v) for k, v in arrays.inputs.items()}, t(arrays.labels),
                 None if arrays.mask is None else t(arrays.mask.astype(np.float32)), arrays.group, len(arrays))


def blocks(source: ParquetSource, schema: FittedSchema, read_rows: int, rng: np.random.Generator | None = None,
           labels: bool = True) -> Iterator[Arrays]:
    for record_batch in source.batches(read_rows=read_rows, rng=rng):
        if record_batch.num_rows:
            yield schema.transform(record_batch, labels=labels)


def minibatches(stream: Iterator[Arrays], batch_size: int, buffer_rows: int = 0,
                rng: np.random.Generator | None = None) -> Iterator[Batch]:
    """Cut a stream of blocks into minibatches; permute rows within a buffer when ``rng`` is given."""
    pending: list[Arrays] = []
    held = 0
    limit = max(buffer_rows, batch_size) if rng is not None else batch_size
    for block in stream:
        pending.append(block)
        held += len(block)
        if held < limit:
            continue
        buf = Arrays.concat(pending)
        if rng is not None:
            buf = buf.take(rng.permutation(len(buf)))
        full = (len(buf) // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield to_batch(buf.take(slice(start, start + batch_size)))
        rest = buf.take(slice(full, None))
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        buf = Arrays.concat(pending)
        if rng is not None:
            buf = buf.take(rng.permutation(len(buf)))
        for start in range(0, len(buf), batch_size):
            yield to_batch(buf.take(slice(start, start + batch_size)))
