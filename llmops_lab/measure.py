"""Measurement: the one timing and memory helper every notebook and benchmark uses.

Timing follows gpt-fast's discipline: warm-up calls, device synchronisation around every timed
region (CUDA events on a GPU), several repeats, and a median with its spread. Memory is measured,
never recomputed: the CUDA caching allocator's peak statistics on a GPU, the profiler's allocation
events on a CPU. The library returns numbers; notebooks decide how to show them.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .checks import is_int, is_real
from .device import as_device


def _as_device(device: str | torch.device | None) -> torch.device:
    """``device.as_device``, with the CPU (not CUDA) for None: timings default to the host clock."""
    return as_device("cpu" if device is None else device)


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work; a no-op on the CPU, where calls already block."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linearly interpolated percentile, q in [0, 1] (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _time_unit(s: float) -> tuple[float, str]:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(s) >= scale:
            return scale, unit
    return 1e-9, "ns"


@dataclass
class Timing:
    """Wall-clock samples of one call, in seconds."""

    samples: list[float]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("Timing needs at least one sample")
        bad = next((s for s in self.samples if not is_real(s) or not 0 <= s < math.inf), None)
        if bad is not None:            # a NaN sorts anywhere: the median would be whatever came out
            raise ValueError(f"Timing samples must be finite seconds >= 0, got {bad!r}")

    median = property(lambda self: statistics.median(self.samples))
    mean = property(lambda self: statistics.fmean(self.samples))
    min = property(lambda self: min(self.samples))
    max = property(lambda self: max(self.samples))
    p10 = property(lambda self: _percentile(sorted(self.samples), 0.10))
    p90 = property(lambda self: _percentile(sorted(self.samples), 0.90))

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def spread(self) -> float:
        """p90 - p10: robust to the odd slow call that a standard deviation amplifies."""
        return self.p90 - self.p10

    def to_dict(self) -> dict[str, Any]:
        keys = ("median", "mean", "stdev", "min", "max", "p10", "p90", "spread")
        return {"n": len(self.samples), **{k: getattr(self, k) for k in keys},
                "samples": list(self.samples)}

    def __str__(self) -> str:
        # ± is half the p10-p90 spread, in the median's unit.
        scale, unit = _time_unit(self.median)
        return (f"{self.median / scale:.3g} {unit} ± {self.spread / 2 / scale:.2g}"
                f" (median of {len(self.samples)})")


def _time_once(fn: Callable, args: tuple, kwargs: dict, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    synchronize(device)
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - t0


def time_fn(fn: Callable, *args: Any, warmup: int = 2, repeats: int = 10,
            device: str | torch.device | None = None, min_time_s: float = 0.0,
            **kwargs: Any) -> Timing:
    """Time ``fn(*args, **kwargs)``.

    Args:
        warmup: untimed calls first (lazy init, allocator growth, kernel compilation).
        repeats: timed calls; with ``min_time_s > 0`` more are added until the timed total
            reaches it, up to ``10 * repeats``.
        device: where fn's work runs; None means the CPU. "cuda" times with CUDA events.

    Returns:
        Timing with one sample (seconds) per timed call.
    """
    if not is_int(repeats) or not is_int(warmup) or repeats < 1 or warmup < 0:
        raise ValueError(f"need integers repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
    if not is_real(min_time_s) or not 0 <= min_time_s < math.inf:
        raise ValueError(f"min_time_s must be a finite number of seconds >= 0, got {min_time_s!r}")
    device = _as_device(device)
    for _ in range(warmup):
        fn(*args, **kwargs)
    synchronize(device)
    samples = [_time_once(fn, args, kwargs, device) for _ in range(repeats)]
    while min_time_s > 0 and sum(samples) < min_time_s and len(samples) < 10 * repeats:
        samples.append(_time_once(fn, args, kwargs, device))
    return Timing(samples)


def time_interleaved(fns: dict[str, Callable], warmup: int = 1, repeats: int = 3,
                     device: str | torch.device | None = None) -> dict[str, Timing]:
    """Time several functions in alternation: each round calls every one of them once.

    A ratio of two timings is only as good as the machine was steady between them. On a shared
    machine (this project's CPU runners among them) its speed drifts by 10-30% over tens of
    seconds; timing A's repeats and then B's puts that drift into A/B. Alternating puts it into
    both, and the medians' ratio keeps only what differs between A and B.

    The rounds' orders are the rows of a Williams design (``williams_orders``): over one cycle of
    them (n rounds for n functions, 2n when n is odd) each function holds each place in the round
    equally often, and each function follows each other one equally often. In a fixed order,
    whatever carries over from one call to the next (caches, allocator state, clock boosts) went
    one way: the round's first call always followed the previous round's last, and A always ran
    after B, never B after A. With two functions the rounds go A B, B A, A B, ... Sample i of every
    function comes from round i, so samples with the same index can be paired.
    """
    if not is_int(repeats) or not is_int(warmup) or repeats < 1 or warmup < 0:
        raise ValueError(f"need integers repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
    device = _as_device(device)
    for _ in range(warmup):                 # untimed: the order does not matter here
        for fn in fns.values():
            fn()
    synchronize(device)
    items = list(fns.items())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    orders = williams_orders(len(items)) if items else []   # no functions: no rounds to time, {} back
    for r in range(repeats if items else 0):
        for i in orders[r % len(orders)]:
            name, fn = items[i]
            samples[name].append(_time_once(fn, (), {}, device))
    return {name: Timing(xs) for name, xs in samples.items()}


def williams_orders(n: int) -> list[list[int]]:
    """Orders of 0..n-1, one per round, balanced for place and for what comes just before
    (Williams 1949): row 0 is 0, 1, n-1, 2, n-2, ...; row r adds r to each entry (mod n). For even
    n these n rows put every ordered pair (a then b) next to each other once; for odd n no n rows
    can, and the rows reversed are added, 2n in all, each pair twice.

    >>> williams_orders(4)
    [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"need n >= 1 functions, got {n!r}")
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 and n > 1 else rows


@dataclass
class PeakMemory:
    """Peak bytes allocated while a function ran, above what was allocated before it."""

    peak_bytes: int
    method: str  # "cuda-allocator" or "cpu-profiler"
    result: Any = field(default=None, repr=False)


def _start_cpu_profiler():
    """An entered profiler recording CPU allocations.

    The non-Kineto autograd profiler records the same allocation events as
    ``torch.profiler.profile`` but starts in milliseconds instead of about a second.
    """
    try:
        prof = torch.autograd.profiler.profile(use_kineto=False, profile_memory=True)
        prof.__enter__()
        return prof
    except (TypeError, RuntimeError, ValueError):
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
        return prof


def _allocation_deltas(prof) -> list[tuple[int, int]]:
    """(time, bytes) of every CPU allocation (+) and free (-) the profiler saw."""
    inner = prof.profiler if isinstance(prof, torch.profiler.profile) else prof
    try:
        from torch._C._profiler import _EventType
        deltas, stack = [], list(inner.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            kind, fields = node.typed
            if kind == _EventType.Allocation and fields.device.type == "cpu":
                deltas.append((node.start_time_ns, fields.alloc_size))
            stack.extend(node.children)
        return deltas
    except (AttributeError, ImportError, TypeError):
        # Coarser: per-op net memory, which hides temporaries freed inside one op.
        return [(int(e.time_range.start * 1e3), e.self_cpu_memory_usage)
                for e in inner.function_events if e.self_cpu_memory_usage]


_measuring = False      # a peak_memory call is running (they cannot nest)


def peak_memory(fn: Callable, *args: Any, device: str | torch.device | None = None,
                **kwargs: Any) -> PeakMemory:
    """Measure the peak extra memory ``fn(*args, **kwargs)`` allocates.

    On CUDA: the caching allocator's ``max_memory_allocated`` minus what was allocated before.
    On the CPU: the running total of the profiler's allocation and free events, in time order.
    The CPU profiler cannot see frees of tensors allocated before it started, so there the peak
    counts only new allocations (never less than what fn needed at its worst moment).
    """
    global _measuring
    device = _as_device(device)
    if _measuring:   # the inner call would reset the allocator's peak (CUDA) or stop the profiler (CPU)
        raise RuntimeError("peak_memory calls cannot be nested: the inner one would spoil the outer one's peak")
    _measuring = True
    try:
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            result = fn(*args, **kwargs)
            synchronize(device)
            return PeakMemory(torch.cuda.max_memory_allocated(device) - before, "cuda-allocator", result)
        prof = _start_cpu_profiler()
        try:
            result = fn(*args, **kwargs)
        finally:
            prof.__exit__(None, None, None)
    finally:
        _measuring = False
    running = peak = 0
    for _, delta in sorted(_allocation_deltas(prof)):
        running += delta
        peak = max(peak, running)
    return PeakMemory(peak, "cpu-profiler", result)


def _storage_sizes(t: torch.Tensor):
    """Yield (key, nbytes) per storage behind t; wrapper subclasses are opened up."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _storage_sizes(getattr(t, name))
        return
    try:
        storage = t.untyped_storage()
        if storage.data_ptr() != 0:  # meta and empty storages all sit at address 0
            yield (t.device, storage.data_ptr()), storage.nbytes()
            return
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    yield ("id", id(t)), t.numel() * t.element_size()


def _unique_bytes(tensors) -> int:
    seen: dict[Any, int] = {}
    for t in tensors:
        for key, nbytes in _storage_sizes(t):
            seen[key] = max(nbytes, seen.get(key, 0))
    return sum(seen.values())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of memory t keeps alive: its whole storage (a view counts its base)."""
    return _unique_bytes([t])


def module_bytes(module: torch.nn.Module, include_buffers: bool = True) -> int:
    """Bytes of a module's parameters (and buffers), each storage counted once.

    Tied weights and packed quantised buffers (int4 in uint8, scales) count at their stored size.
    """
    tensors = list(module.parameters())
    if include_buffers:
        tensors += list(module.buffers())
    return _unique_bytes(tensors)


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameter elements, tied parameters counted once."""
    return sum(p.numel() for p in module.parameters())


def _check_rate(what: str, amount, seconds) -> None:
    if not is_real(seconds) or not 0 < seconds < math.inf:
        raise ValueError(f"seconds must be a finite number > 0, got {seconds!r}")
    if not is_real(amount) or not 0 <= amount < math.inf:
        raise ValueError(f"{what} must be a finite number >= 0, got {amount!r}")


def bandwidth_gbs(bytes_moved: float, seconds: float) -> float:
    """Achieved memory bandwidth in GB/s (1e9 bytes per second)."""
    _check_rate("bytes_moved", bytes_moved, seconds)
    return bytes_moved / seconds / 1e9


def tflops(flops: float, seconds: float) -> float:
    """Achieved compute in TFLOP/s (1e12 floating-point operations per second)."""
    _check_rate("flops", flops, seconds)
    return flops / seconds / 1e12
