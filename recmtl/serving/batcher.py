"""Dynamic micro-batching: concurrent requests to one model merged into one onnxruntime call."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Outputs = list[np.ndarray]


@dataclass
class _Pending:
    feeds: Any
    rows: int
    future: asyncio.Future


class MicroBatcher:
    """Runs requests of ``rows`` rows through ``run``; while batching is on (``max_batch_size`` > 0), requests
    that arrive within ``max_wait_ms`` of each other are merged by ``merge`` into one call of up to
    ``max_batch_size`` rows, and each gets back its own slice of the outputs. A request of more rows runs
    alone, in calls of ``max_batch_size`` rows (``chunk_rows`` when batching is off), so onnxruntime's memory
    for one call stays that of ``max_batch_size`` rows whatever the request; its last call is
    ``run(feeds, True)``, the others ``run(feeds, False)``, so that ``run`` can give memory back after it.
    ``observe(rows)`` is told the size of every call (a metric)."""

    def __init__(self, run: Callable[..., Outputs], merge: Callable[[list[Any]], dict[str, np.ndarray]],
                 max_batch_size: int, max_wait_ms: float, observe: Callable[[int], None] = lambda rows: None,
                 chunk_rows: int = 1024) -> None:
        self.run, self.merge, self.observe = run, merge, observe
        self.max_batch_size, self.max_wait_ms = max_batch_size, max_wait_ms
        self.chunk_rows = max_batch_size if max_batch_size > 0 else chunk_rows
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.active = 0  # requests waiting for a batched result

    async def infer(self, feeds: Any, rows: int) -> Outputs:
        """Scores per task for ``rows`` rows; merged with concurrent requests when batching is on."""
        loop = asyncio.get_running_loop()
        if self.max_batch_size <= 0 or rows >= self.max_batch_size:
            return await loop.run_in_executor(None, self.run_chunked, self.merge([feeds]), rows)
        if self.worker is None:
            self.queue = asyncio.Queue()
            self.worker = loop.create_task(self._batch_loop())
        fut = loop.create_future()
        self.active += 1
        try:
            await self.queue.put(_Pending(feeds, rows, fut))
            return await fut
        finally:
            self.active -= 1

    def run_chunked(self, feeds: dict[str, np.ndarray], rows: int) -> Outputs:
        """``run`` over slices of at most ``chunk_rows`` rows, outputs concatenated."""
        step = self.chunk_rows
        if rows <= step:
            self.observe(rows)
            return self.run(feeds)
        parts = []
        for start in range(0, rows, step):
            self.observe(min(step, rows - start))
            parts.append(self.run({k: v[start:start + step] for k, v in feeds.items()}, start + step >= rows))
        return [np.concatenate(outs) for outs in zip(*parts)]

    async def _batch_loop(self) -> None:
        """Collect requests until ``max_batch_size`` rows or ``max_wait_ms`` after the first, then run
        them as one call; up to two calls run at once so decoding the next requests overlaps inference."""
        loop = asyncio.get_running_loop()
        running = asyncio.Semaphore(2)
        carry: _Pending | None = None
        while True:
            first = carry or await self.queue.get()
            carry = None
            batch, rows = [first], first.rows
            deadline = loop.time() + self.max_wait_ms / 1000
            while rows < self.max_batch_size:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self.active <= len(batch):
                        break  # waited enough, or nobody else is waiting: do not add latency
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                if rows + item.rows > self.max_batch_size:
                    carry = item  # starts the next batch
                    break
                batch.append(item)
                rows += item.rows
            await running.acquire()
            loop.create_task(self._run_batch(batch, rows, running))

    async def _run_batch(self, batch: list[_Pending], rows: int, running: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            feeds = self.merge([p.feeds for p in batch])
            self.observe(rows)
            outputs = await loop.run_in_executor(None, self.run, feeds)
        except Exception as exc:  # pragma: no cover - onnxruntime failure on valid input
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            running.release()
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result([o[start:start + p.rows] for o in outputs])
            start += p.rows
