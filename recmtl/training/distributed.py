"""Data-parallel training across processes started by ``torchrun`` (one node or several).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with
``WORLD_SIZE`` > 1 the process group is created with gloo on CPU and NCCL on GPU. What each rank does:

- every rank holds a full replica of the model; the parameters (and buffers) are broadcast from rank 0
  at the start and the buffers again before each validation, as ``DistributedDataParallel`` does;
- rank ``r`` reads its own share of the training data (:func:`recmtl.data.parquet.shard_units`), with the same
  seeded shuffle on every rank, and ``train.batch_size`` / world size rows per step, so the global batch
  is the configured one;
- after the balancer's backward pass every gradient is averaged across ranks (:meth:`Context.average_gradients`),
  then each rank takes the same optimizer step. This is DDP's arithmetic done with explicit collectives
  instead of the ``DistributedDataParallel`` wrapper, because balancers run their own backward and
  gradient-manipulation balancers call ``torch.autograd.grad`` (which bypasses DDP's reducer hooks), and
  because NCCL cannot all-reduce the sparse gradients of ``nn.Embedding(sparse=True)``: sparse gradients
  are all-gathered (ids and rows) and summed, so ``SparseAdam`` still touches only the rows in the global
  batch, on gloo and NCCL alike. A gradient-surgery balancer therefore works on each rank's local batch and
  the ranks' results are averaged. The balancer's own parameters and buffers are averaged after every step
  too, so state it updates inside ``backward`` (FAMO's logits, GradNorm's initial losses, ...) stays the
  same on every rank; state kept in plain attributes stays per rank;
- validation and test rows are scored by every rank, each its share, and gathered on rank 0, which
  computes the metrics (AUC and GAUC do not average over shards) and broadcasts them;
- every rank runs the same number of steps per epoch: a rank that runs out of batches ends the epoch for
  all (the flag travels with the gradient collectives, so it costs no extra round trip);
- every rank counts its share of the row groups for the schema (the fit pass, :func:`recmtl.schema.fit_schema`),
  rank 0 merges the counts, fits it and broadcasts it; only rank 0 writes the run directory, checkpoints, metrics.json,
  progress bars and log lines, and calls the life-cycle hooks; on ``--resume`` rank 0 reads ``last.pt`` and
  broadcasts it, so no shared file system is needed.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recmtl.errors import ConfigError

T = TypeVar("T")

#: how long ranks wait for each other (rank 0's fit pass and validation included)
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("RECMTL_DIST_TIMEOUT_S", "7200")))


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables ``torchrun`` sets; (0, 1, 0) without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    return rank, world, local


@dataclass
class Context:
    """This process's place in the job; with ``world == 1`` every method is a cheap no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    _all_next: bool | None = None
    _local_next: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.world > 1 else None

    # ---- objects and barriers -------------------------------------------------------------------
    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather_object(self, obj: T) -> list[T] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj`` on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    # ---- model state ----------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_state(self, modules: Iterable[nn.Module], buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
        if self.world == 1:
            return
        tensors = []
        for m in modules:
            if not buffers_only:
                tensors += [p.data for p in m.parameters()]
            tensors += [b for b in m.buffers()]
        for t in tensors:
            dist.broadcast(t, src=0)

    # ---- steps and gradients --------------------------------------------------------------------
    def steps(self, stream: Iterable[T]) -> Iterator[T]:
        """``stream`` cut to the same number of items on every rank (the smallest count).

        The loop body must call :meth:`average_gradients` once per item: it carries the "I have another
        batch" flag. Without it (e.g. the body skipped the step) a separate all-reduce does.
        """
        it = iter(stream)
        if self.world == 1:
            yield from it
            return
        sentinel = object()
        nxt = next(it, sentinel)
        if not self._flag_all(nxt is not sentinel):
            return
        while True:
            current, nxt = nxt, next(it, sentinel)
            self._local_next = nxt is not sentinel
            self._all_next = None
            yield current  # type: ignore[misc]
            all_next = self._all_next if self._all_next is not None else self._flag_all(self._local_next)
            if not all_next:
                return

    def _flag_all(self, local: bool) -> bool:
        t = torch.tensor([1 if local else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    @torch.no_grad()
    def average_gradients(self, params: list[nn.Parameter], states: Iterable[torch.Tensor] = (),
                          bucket_bytes: int = 32 << 20) -> None:
        """Average ``p.grad`` over ranks, and the values of ``states`` (e.g. a balancer's parameters and
        buffers that it updates itself inside ``backward``).

        Two collectives per step whatever the model: one all-reduce of every dense gradient and state,
        flattened, with a small header (who has which gradient, the sparse gradients' sizes, whether each
        rank has another batch), and one all-gather of every sparse gradient's ids and rows, packed into
        bytes, which are then summed. A gradient missing (None) on some ranks counts as zeros there; one
        missing on all ranks stays None, so optimisers skip that parameter as in a single process. Buckets
        of ``bucket_bytes`` bound the temporary memory of very large dense models."""
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        sparse = [p for p in params if (p.grad is not None and p.grad.is_sparse) or _is_sparse_param(p)]
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in params if id(p) not in sparse_ids]
        for p in sparse:
            if p.grad is not None:
                p.grad = p.grad.coalesce()
        n, w = len(params), self.world
        header = torch.zeros(n + len(sparse) * w + 1, dtype=torch.float64)
        for i, p in enumerate(params):
            header[i] = p.grad is not None
        for j, p in enumerate(sparse):
            header[n + j * w + self.rank] = p.grad._nnz() if p.grad is not None else 0
        header[-1] = self._local_next
        # dense: flat buffers per dtype (the header rides with float32, exact for counts below 2**24)
        items: list[tuple[torch.Tensor, Any]] = [(p.grad if p.grad is not None else torch.zeros_like(p), p)
                                                 for p in dense]
        items += [(t, None) for t in states if t.is_floating_point()]
        header_done = False
        for bucket in _buckets(items, bucket_bytes):
            dtype = bucket[0][0].dtype
            with_header = not header_done and dtype == torch.float32
            flat = torch.cat([t.reshape(-1) for t, _ in bucket]
                             + ([header.to(self.device, torch.float32)] if with_header else []))
            dist.all_reduce(flat)
            if with_header:
                header, flat = flat[-len(header):].double().cpu(), flat[:-len(header)]
                header_done = True
            flat.div_(w)
            offset = 0
            for t, p in bucket:
                k = t.numel()
                if p is None:
                    t.copy_(flat[offset:offset + k].view_as(t))
                else:
                    p.grad = flat[offset:offset + k].view_as(t).clone()
                offset += k
        if not header_done:
            header = header.to(self.device)
            dist.all_reduce(header)
            header = header.cpu()
        self._all_next = bool(header[-1] >= w)
        for i, p in enumerate(params):
            if header[i] == 0:  # no rank had a gradient for it
                p.grad = None
        if sparse:
            counts = header[n:n + len(sparse) * w].long().view(len(sparse), w)
            self._average_sparse(sparse, counts)

    def _average_sparse(self, sparse: list[nn.Parameter], counts: torch.Tensor) -> None:
        """All-gather every sparse gradient (ids and rows, padded to the largest count) in one byte buffer."""
        layout = []  # per parameter: (ndim of ids, values per row, dtype, most rows on a rank)
        parts = []
        for j, p in enumerate(sparse):
            most = int(counts[j].max())
            ndim, row = 1, int(np.prod(p.shape[1:]))  # nn.Embedding: ids index the first dimension
            g = p.grad
            idx = torch.zeros((most, ndim), dtype=torch.int64, device=p.device)
            vals = torch.zeros((most, row), dtype=p.dtype, device=p.device)
            if g is not None and g._nnz():
                idx[:g._nnz()] = g._indices().t()
                vals[:g._nnz()] = g._values().reshape(g._nnz(), row)
            parts += [idx.reshape(-1).view(torch.uint8), vals.reshape(-1).view(torch.uint8)]
            layout.append((ndim, row, most))
        local = torch.cat(parts)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        offset = 0
        for j, (p, (ndim, row, most)) in enumerate(zip(sparse, layout)):
            isize, vsize = most * ndim * 8, most * row * p.element_size()
            ids, rows = [], []
            for r, buf in enumerate(gathered):
                c = int(counts[j, r])
                ids.append(buf[offset:offset + isize].view(torch.int64).view(most, ndim)[:c])
                rows.append(buf[offset + isize:offset + isize + vsize].view(p.dtype).view(most, row)[:c])
            offset += isize + vsize
            idx, vals = torch.cat(ids).t(), torch.cat(rows).view(-1, *p.shape[1:]) / self.world
            p.grad = torch.sparse_coo_tensor(idx, vals, p.shape, check_invariants=False).coalesce()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _is_sparse_param(p: nn.Parameter) -> bool:
    return bool(getattr(p, "_recmtl_sparse", False))


def mark_sparse(params: Iterable[nn.Parameter]) -> None:
    """Remember which parameters get sparse gradients (a rank whose batch missed one still sends none)."""
    for p in params:
        p._recmtl_sparse = True  # type: ignore[attr-defined]


def _buckets(items: list[tuple[torch.Tensor, Any]], bucket_bytes: int) -> Iterator[list[tuple[torch.Tensor, Any]]]:
    """Consecutive items of one dtype and device, at most ``bucket_bytes`` a bucket (or one larger item)."""
    bucket: list[tuple[torch.Tensor, Any]] = []
    size = 0
    key = None
    for t, owner in sorted(items, key=lambda it: str(it[0].dtype) != "torch.float32"):
        k = (t.dtype, t.device)
        nbytes = t.numel() * t.element_size()
        if bucket and (k != key or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((t, owner))
        size += nbytes
        key = k
    if bucket:
        yield bucket


def setup(device_spec: str) -> Context:
    """Resolve the device and, under torchrun with more than one process, join the process group."""
    from recmtl.training.device import resolve_device
    rank, world, local = env_world()
    device = resolve_device(device_spec, local)
    if world == 1:
        return Context(0, 1, 0, device, None)
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT, rank=rank, world_size=world,
                                **({"device_id": device} if backend == "nccl" else {}))
    return Context(rank, world, local, device, backend)


# ---- memory estimate -----------------------------------------------------------------------------
def memory_estimate(model: nn.Module, balancer: nn.Module, optimizers: list[torch.optim.Optimizer],
                    sparse: list[nn.Parameter], rows_in_memory: int, bytes_per_row: int) -> dict[str, int]:
    """Bytes one rank needs, before activations: every rank holds the full model (no sharding).

    ``parameters`` (``embedding_tables`` of them), ``gradients`` (dense ones; sparse gradients are as large
    as the ids of a batch), ``optimizer_state`` (Adam/AdamW/SparseAdam: two values per parameter, Adagrad
    one, SGD none) and ``data`` (the shuffle buffer plus one read of preprocessed rows)."""
    sparse_ids = {id(p) for p in sparse}
    params = list(model.parameters()) + list(balancer.parameters())
    nbytes = {id(p): p.numel() * p.element_size() for p in params}
    total = sum(nbytes.values())
    tables = sum(nbytes[i] for i in sparse_ids)
    tables += sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and id(m.weight) not in sparse_ids)
    grads = sum(b for i, b in nbytes.items() if i not in sparse_ids)
    state = 0
    per_param = {"Adam": 2, "AdamW": 2, "SparseAdam": 2, "Adagrad": 1, "SGD": 0}
    for opt in optimizers:
        k = per_param.get(type(opt).__name__, 2)
        state += k * sum(nbytes.get(id(p), 0) for g in opt.param_groups for p in g["params"])
    data = rows_in_memory * bytes_per_row
    return {"parameters": total, "embedding_tables": tables, "gradients": grads, "optimizer_state": state,
            "data": data, "total": total + grads + state + data}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
