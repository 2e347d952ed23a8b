"""Where training runs and in which precision: ``--device cpu|cuda|auto`` and ``train.precision``.

Mixed precision is ``torch.autocast``: ``bf16`` needs no loss scaling; ``fp16`` uses ``torch.amp.GradScaler``.
Balancers do their own backward pass (``Balancer.backward``), so the loss scale cannot simply multiply the
combined loss: a balancer with learnt weights (uncertainty weighting) would see scaled loss values. Instead
each task loss passes through an identity whose backward multiplies the gradient by the scale, so balancers
see true loss values and every model gradient comes out multiplied by the scale; the balancer's own
parameters (which sit after the losses) get their gradient multiplied here, and ``GradScaler`` then unscales,
checks for inf/NaN, skips such steps and adapts the scale as usual. Balancers that compare per-task gradient
norms see them multiplied by one common factor; prefer bf16 for them.
"""
from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from recmtl.errors import ConfigError


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (the GPU of this process's local rank) or ``auto`` (cuda when available)."""
    if spec not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device '{spec}': use cpu, cuda or auto")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"--device cuda: CUDA is not available here (torch {torch.__version__} is {build}, "
                          "or no GPU is visible); use --device cpu or --device auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} needs GPU {local_rank} but only {count} GPU(s) are visible; "
                          "start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix units as this torch build reports them: ``"AMX"`` (AMX tiles), ``"AVX-512 BF16"``,
    or None (e.g. AVX2-only CPUs, where bf16 autocast works but is emulated and slower than fp32)."""
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
            return "AMX"
        if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
            return "AVX-512 BF16"
    except RuntimeError:  # a build without cpuinfo
        return None
    return None


_warned_slow_bf16 = False


def resolve_precision(spec: str, device: torch.device, warn: Callable[[str], None] | None = None) -> str:
    """``auto``: on CPU bf16 autocast when the CPU has bf16 matrix units (``cpu_bf16_units``: AMX tiles or
    AVX-512 BF16), else fp32; on GPUs bf16 where supported, else fp16. ``bf16`` asked for on a CPU without those
    units works (emulated, slower than fp32): ``warn`` is told once per process."""
    global _warned_slow_bf16
    if spec not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision '{spec}': use auto, fp32, bf16 or fp16")
    if device.type != "cuda":
        units = cpu_bf16_units()
        if spec == "bf16" and units is None and warn is not None and not _warned_slow_bf16:
            _warned_slow_bf16 = True
            warn("warning: train.precision bf16: this CPU has no bf16 matrix units (AMX or AVX-512 BF16), so bf16 "
                 "autocast is emulated and slower than fp32; train.precision auto (or --precision auto) picks fp32 here")
        if spec == "auto":
            return "bf16" if units is not None else "fp32"
        return spec
    if spec != "auto":
        return spec
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def wants_probe(spec: str, device: torch.device, world: int = 1) -> bool:
    """Whether ``train.precision: auto`` is settled by :class:`PrecisionProbe`: on one CPU process whose CPU has
    bf16 matrix units (there bf16 autocast pays for wide layers and large batches but costs more than it saves
    for narrow layers or small batches). Elsewhere ``resolve_precision``'s rule stands (under torchrun every
    rank keeps the units' rule, so that the ranks agree without a measurement)."""
    return spec == "auto" and device.type == "cpu" and world == 1 and cpu_bf16_units() is not None


def choose_precision(seconds: dict[str, list[float]], margin: float) -> str:
    """bf16 when the median bf16 step time (seconds per row) is at least ``margin`` below fp32's, else fp32: a
    tie or a measurement lost in the noise keeps the fp32 path."""
    fp32, bf16 = statistics.median(seconds["fp32"]), statistics.median(seconds["bf16"])
    return "bf16" if bf16 <= (1.0 - margin) * fp32 else "fp32"


def decide_early(seconds: dict[str, list[float]], pairs: int, margin: float) -> str | None:
    """The probe's early decision after ``pairs`` measured steps of each precision: the precision of which every
    step took at most ``1 - margin`` times the other's fastest step (an unambiguous gap, e.g. bf16 on AMX for
    wide layers; one neighbour's load spike cannot make it, as it would have to slow every step of one precision),
    else None (the probe goes on). ``pairs`` 0: never."""
    fp32, bf16 = seconds["fp32"], seconds["bf16"]
    if pairs <= 0 or len(fp32) < pairs or len(bf16) < pairs:
        return None
    if max(bf16) <= (1.0 - margin) * min(fp32):
        return "bf16"
    if max(fp32) <= (1.0 - margin) * min(bf16):
        return "fp32"
    return None


class PrecisionProbe:
    """``train.precision: auto`` on a CPU with bf16 units: the first training steps alternate fp32 and bf16
    autocast (one warm-up step of each, then ``steps`` of each, interleaved so that a neighbour's load hits both
    alike); each step's compute time (forward, backward, optimiser; not the data) per row is recorded, and the
    faster precision (:func:`choose_precision`, ``margin``) is kept for the rest of the run. After ``early_pairs``
    measured steps of each it stops early when :func:`decide_early` (``early_margin``) finds one precision faster
    in every step by far more than ``margin``: the same decision, fewer steps in the slower precision. The
    probe's steps are ordinary training steps (fp32 master weights either way)."""

    def __init__(self, steps: int = 5, margin: float = 0.05, early_pairs: int = 2, early_margin: float = 0.4) -> None:
        self.schedule = ["fp32", "bf16"] * (steps + 1)
        self.margin = margin
        self.early_pairs, self.early_margin = early_pairs, early_margin
        self.seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
        self.decided: str | None = None
        self._i = 0

    def next_mode(self) -> str:
        """The precision of the next step (the decision once made)."""
        return self.decided or self.schedule[self._i]

    def record(self, rows: int, seconds: float) -> str | None:
        """The step just taken in :meth:`next_mode`'s precision took ``seconds`` for ``rows`` rows; returns the
        decision when this step completes the probe, else None."""
        if self.decided is not None:
            return None
        mode = self.schedule[self._i]
        if self._i >= 2:  # the first step of each precision warms up (optimiser state, allocator)
            self.seconds[mode].append(seconds / max(rows, 1))
        self._i += 1
        if self._i == len(self.schedule):
            self.decided = choose_precision(self.seconds, self.margin)
            return self.decided
        if self._i % 2 == 0 and (early := decide_early(self.seconds, self.early_pairs, self.early_margin)):
            self.decided = early
            return early
        return None

    def speedup(self) -> float:
        """fp32's median step time over bf16's (> 1: bf16 faster)."""
        return statistics.median(self.seconds["fp32"]) / statistics.median(self.seconds["bf16"])

    def summary(self) -> dict:
        """What run.json records: the decision, the steps it took, the median ms per 1,000 rows of each precision,
        the speed-up."""
        return {"decided": self.decided, "steps": self._i, "margin": self.margin,
                "speedup_bf16": round(self.speedup(), 3),
                "ms_per_1000_rows": {m: round(1e6 * statistics.median(v), 3) for m, v in self.seconds.items()}}


def precision_reason(mode: str, spec: str, device: torch.device, probe: PrecisionProbe | None = None) -> str:
    """One line saying which precision training uses and why (printed at start, stored in run.json); with a
    ``probe`` still running, that it is probing, and once decided, what it measured."""
    if device.type == "cuda":
        why = "GPU" if spec == "auto" else f"train.precision {spec}"
    elif spec != "auto":
        why = f"train.precision {spec}"
    else:
        units = cpu_bf16_units()
        why = (f"auto: this CPU has {units}" if units else
               "auto: this CPU has no bf16 matrix units (AMX or AVX-512 BF16)")
        if probe is not None and probe.decided is None:
            early = (f"; {2 * (probe.early_pairs + 1)} when every step of one is at least "
                     f"{1 / (1 - probe.early_margin):.2f}x as fast as the other's" if probe.early_pairs > 0 else "")
            return (f"precision auto (this CPU has {units}: the first {len(probe.schedule)} steps alternate fp32 "
                    f"and bf16 autocast{early}, then the faster is kept)")
        if probe is not None:
            x = probe.speedup()
            why += (f"; bf16 steps measured {x:.2f}x as fast as fp32" if mode == "bf16" else
                    f", but bf16 steps measured {x:.2f}x as fast as fp32 (kept only from "
                    f"{1 / (1 - probe.margin):.2f}x)")
    amp = {"bf16": "bf16 autocast, fp32 weights and optimizer state", "fp16": "fp16 autocast with loss scaling"}
    return f"precision {mode} ({amp[mode] + '; ' if mode in amp else ''}{why})"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


class Precision:
    """Autocast for the forward pass and, for fp16, loss scaling around the balancer's backward."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def use(self, mode: str) -> None:
        """Switch between ``fp32`` and ``bf16`` (the :class:`PrecisionProbe`; neither has loss scaling)."""
        if mode not in ("fp32", "bf16") or self.scaler is not None:
            raise ValueError(f"Precision.use('{mode}'): only fp32 <-> bf16 switch at run time")
        self.mode, self.dtype = mode, torch.bfloat16 if mode == "bf16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses in fp32; with fp16, wrapped so their gradients are multiplied by the loss scale."""
        losses = {t: v.float() for t, v in losses.items()}
        if self.scaler is None:
            return losses
        scale = self.scaler.scale(torch.ones((), device=self.device))  # also creates the scale lazily
        return {t: _ScaleGrad.apply(v, scale.detach()) for t, v in losses.items()}

    def grad_scale(self) -> float:
        """The factor the gradients of :meth:`scale_losses`' losses carry: the loss scale with fp16, else 1."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def scale_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Multiply the gradients present by the loss scale (for a term back-propagated on its own, such as
        a tower's regularisation, so that unscaling in :meth:`step` leaves it as it was); fp16 only."""
        if self.scaler is None:
            return
        scale = self.scaler.get_scale()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)

    def step(self, optimizers: Iterable[torch.optim.Optimizer], unscaled: Iterable[nn.Parameter] = ()) -> None:
        """``unscaled``: parameters whose gradient did not pass through a loss (the balancer's own)."""
        if self.scaler is None:
            for opt in optimizers:
                opt.step()
            return
        scale = self.scaler.get_scale()
        for p in unscaled:
            if p.grad is not None:
                p.grad.mul_(scale)
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def batches_to(stream: Iterable, device: torch.device) -> Iterator:
    """Move each batch of ``stream`` to ``device`` (a no-op on CPU)."""
    for batch in stream:
        yield batch.to(device) if device.type != "cpu" else batch
