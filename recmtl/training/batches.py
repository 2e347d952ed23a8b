"""Parquet -> preprocessed numpy blocks -> shuffled minibatches of tensors, with bounded memory.

Shuffling is two-level: row groups are read in a random order each epoch, and rows are permuted inside
a buffer of ``shuffle_buffer`` rows. Peak memory is about ``shuffle_buffer + read_rows`` preprocessed
rows, whatever the data size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recmtl.data.parquet import ParquetSource
from recmtl.errors import DataError
from recmtl.schema import Arrays, FittedSchema


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    mask: torch.Tensor | None
    group: np.ndarray | None
    rows: int

    def to(self, device: torch.device) -> Batch:
        """The tensors on ``device`` (``group`` stays a numpy array)."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)
        return Batch({k: mv(v) for k, v in self.inputs.items()}, mv(self.labels), mv(self.mask), self.group, self.rows)


def to_batch(arrays: Arrays) -> Batch:
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return Batch({k: t(v) for k, v in arrays.inputs.items()}, t(arrays.labels),
                 None if arrays.mask is None else t(arrays.mask.astype(np.float32)), arrays.group, len(arrays))


def blocks(source: ParquetSource, schema: FittedSchema, read_rows: int, rng: np.random.Generator | None = None,
           labels: bool = True, shard: tuple[int, int] | None = None) -> Iterator[Arrays]:
    """Preprocessed blocks of ``source``; ``shard=(rank, world)``: this rank's share only."""
    for record_batch in source.batches(read_rows=read_rows, rng=rng, shard=shard):
        if record_batch.num_rows:
            yield schema.transform(record_batch, labels=labels)


def _rows(arrays: Arrays, order: np.ndarray | None, start: int, stop: int) -> Arrays:
    """Rows ``start:stop`` of ``arrays`` taken in ``order`` (a permutation of its rows; None: as they are).
    Gathering one minibatch at a time (``np.take``) instead of permuting the whole buffer up front yields the
    same rows, without writing and re-reading a buffer-sized copy."""
    if order is None:
        return arrays.take(slice(start, stop))
    idx = order[start:stop]

    def sub(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.take(a, idx, axis=0)
    return Arrays({k: np.take(v, idx, axis=0) for k, v in arrays.inputs.items()}, sub(arrays.labels),
                  sub(arrays.mask), sub(arrays.group))


def _concat_reusing(blocks: list[Arrays], store: dict[str, np.ndarray], spare: int) -> Arrays:
    """``Arrays.concat(blocks)`` written into arrays kept in ``store`` and reused by the next buffer: a fresh
    buffer-sized array costs page faults on every write. Only for buffers whose minibatches are copies."""
    if len(blocks) == 1:
        return blocks[0]
    n = sum(len(b) for b in blocks)

    def cat(key: str, items: list[np.ndarray | None]) -> np.ndarray | None:
        if items[0] is None:
            return None
        dtype, tail = np.result_type(*items), items[0].shape[1:]
        arr = store.get(key)
        if arr is None or len(arr) < n or arr.dtype != dtype or arr.shape[1:] != tail:
            arr = store[key] = np.empty((n + spare, *tail), dtype=dtype)
        return np.concatenate(items, out=arr[:n])
    return Arrays({k: cat(k, [b.inputs[k] for b in blocks]) for k in blocks[0].inputs},
                  cat(" labels", [b.labels for b in blocks]), cat(" mask", [b.mask for b in blocks]),
                  cat(" group", [b.group for b in blocks]))


def minibatches(stream: Iterator[Arrays], batch_size: int, buffer_rows: int = 0,
                rng: np.random.Generator | None = None) -> Iterator[Batch]:
    """Cut a stream of blocks into minibatches; permute rows within a buffer when ``rng`` is given."""
    pending: list[Arrays] = []
    held = 0
    store: dict[str, np.ndarray] = {}
    limit = max(buffer_rows, batch_size) if rng is not None else batch_size
    for block in stream:
        pending.append(block)
        held += len(block)
        if held < limit:
            continue
        # shuffled minibatches are gathered copies, so the buffer's memory can be reused
        buf = _concat_reusing(pending, store, batch_size) if rng is not None else Arrays.concat(pending)
        order = rng.permutation(len(buf)) if rng is not None else None
        full = (len(buf) // batch_size) * batch_size
        for start in range(0, full, batch_size):
            yield to_batch(_rows(buf, order, start, start + batch_size))
        rest = _rows(buf, order, full, len(buf))
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        buf = Arrays.concat(pending)
        order = rng.permutation(len(buf)) if rng is not None else None
        for start in range(0, len(buf), batch_size):
            yield to_batch(_rows(buf, order, start, start + batch_size))


class Passes:
    """One continuing stream of steps over passes ``p, p + 1, ...`` of the training data (``train.steps_per_epoch``).

    ``make(p, skip)`` gives pass ``p``'s items with its first ``skip`` dropped. Iterating yields the items of the
    current pass, then of the next, without end; :attr:`pass_index` and :attr:`step` are the position of the next
    item (``step`` items of pass ``pass_index`` taken), so a stream built at a saved position continues with the
    same items. A pass with no items at all is a DataError."""

    def __init__(self, make: Callable[[int, int], Iterable[Any]], pass_index: int = 0, step: int = 0,
                 what: str = "the training data") -> None:
        self.make, self.pass_index, self.step, self.what = make, pass_index, step, what
        self._items = self._stream()

    def _stream(self) -> Iterator[Any]:
        while True:
            for item in self.make(self.pass_index, self.step):
                self.step += 1
                yield item
            if self.step == 0:
                raise DataError(f"{self.what} produced no batches")
            self.pass_index, self.step = self.pass_index + 1, 0

    def __iter__(self) -> Iterator[Any]:
        return self._items

    def __next__(self) -> Any:
        return next(self._items)

    @property
    def position(self) -> list[int]:
        """``[pass, step]``: where the next item comes from (saved in checkpoints)."""
        return [self.pass_index, self.step]
