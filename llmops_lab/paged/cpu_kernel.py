"""The paged decode kernel for a CPU: ``csrc/paged_decode_cpu.c``, compiled on first use.

On a GPU the engine's decode attention reads the block pool in place (``triton_paged``). On a CPU
its reference gathers every sequence's blocks into one padded [B, longest, Hkv, D] copy per layer
and runs SDPA over it with a mask. In the batching bench's steady state the longest context of a
step was 2.45x the mean (this and the CPU timings below were measured on this project's machines
while writing this and are not kept as files; where a command is named, it measures them again), so
that reference copied and scored 2.45 keys for each one it needed (gather, SDPA and the mask's
conversion took 20% of the engine's CPU time). The C kernel reads each sequence's own blocks, to its
own length, with no copy: what vLLM's CPU backend does with its own paged-attention kernel. It is
fp32 only, and specialised for head dims 32, 64 and 128 with 1, 2, 4 or 8 query heads per KV head;
anything else, or a machine without a C compiler, takes the reference (``available`` says why).
Through strides it reads three layouts: the engine's token-major pool, ``PagedKVCache``'s
heads-first pool, and a contiguous [B, Hkv, S, D] cache (``contiguous_decode_cpu``).

A call's rows are shared among PyTorch's own OpenMP threads (``shares_torch_threads``; a
single-threaded build where PyTorch's threads are not libgomp's, as a second runtime's spinning
threads beside PyTorch's made both slower). Over the batching bench's 192 requests the engine's
decode attention took 0.68-0.96 s through it against 1.89-3.06 s through the reference (2026-11-27,
this project's 2-core AMD EPYC with AVX2 and no AVX-512; six runs of it and four of the reference,
the machine's speed drifting; ``python -m llmops_lab.paged.experiment --engine 2`` measures it). One
call on 16 rows of 256 tokens: 151 us, against 269 us for SDPA on a contiguous cache and 619 us for
the reference (``python -m llmops_lab.paged.experiment``). Its first version, single-threaded on
16-float vectors, took 2.36-2.38 s there, slower than the reference: without AVX-512 the compiler
split each vector in two and spilled the halves to the stack (on the AVX-512 machine of 2026-11-26
it had taken 0.83-0.89 s against 1.58-1.70 s).

The library is built with the system's C compiler (``$CC``, else ``cc``) at ``-O3 -march=native``
into a per-user cache, keyed by the source, the flags, the compiler and this CPU's feature flags,
so a machine builds it once (about a second) and never runs code compiled for another CPU.
``python -m llmops_lab.paged.experiment`` times it against SDPA on this machine.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.c"
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
         "-shared", "-fPIC"]
OPENMP = "-fopenmp"                 # rows shared among PyTorch's OpenMP threads (see shares_torch_threads)
HEAD_DIMS = (32, 64, 128)
GROUP_SIZES = (1, 2, 4, 8)          # query heads per KV head

_lock = threading.Lock()
_lib = None                         # the loaded library, once built
_why_not: str | None = None         # why it could not be built (then the reference runs)
_threaded = False                   # whether the loaded build shares rows among PyTorch's threads


def cache_dir() -> Path:
    """``$LLMOPS_LAB_CACHE``, else ``$XDG_CACHE_HOME/llmops_lab``, else ``~/.cache/llmops_lab``."""
    if os.environ.get("LLMOPS_LAB_CACHE"):
        return Path(os.environ["LLMOPS_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmops_lab"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def library_path(cc: str, flags: list[str] = FLAGS) -> Path:
    """Where the build for this source, compiler, flags and CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, *version, *flags, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"paged_decode_cpu-{key}.so"


def _gomp_libraries() -> set[str]:
    """The GNU OpenMP runtimes mapped into this process (Linux), by file."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if Path(line.split()[-1]).name.startswith("libgomp")}
    except OSError:
        return set()


def torch_runs_libgomp() -> bool:
    """Whether PyTorch's threads are GNU OpenMP's and the library it loaded is ``libgomp.so.1``
    (Linux wheels: ``torch/lib/libgomp.so.1``). A build with ``-fopenmp`` names ``libgomp.so.1``, and
    the dynamic linker then binds it to the library already loaded: one pool of threads for both,
    sized by ``torch.set_num_threads``. Where PyTorch runs anything else, the kernel's own OpenMP
    runtime would keep a second pool spinning beside PyTorch's, both slower: a single-threaded
    build runs instead."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    return any(Path(p).name in ("libgomp.so.1", "libgomp.so.1.0.0") for p in _gomp_libraries())


def _compile(cc: str, flags: list[str]) -> Path:
    path = library_path(cc, flags)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:     # built aside, then moved in whole
            part = Path(tmp) / path.name
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(part)], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
            os.replace(part, path)
    return path


def _build():
    """The loaded library, and whether it shares rows among PyTorch's threads: built with OpenMP
    where PyTorch's own libgomp is loaded and the compiler can, else single-threaded."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found)")
    lib, threaded = None, False
    if torch_runs_libgomp():
        before = _gomp_libraries()
        try:
            lib = ctypes.CDLL(str(_compile(cc, [OPENMP if f == "-fopenmp-simd" else f for f in FLAGS])))
            # bound to PyTorch's runtime, no second one; else the single-threaded build is loaded and
            # called instead, and the second runtime, never entered, starts no threads
            threaded = _gomp_libraries() == before
        except (RuntimeError, OSError):                 # e.g. a compiler without OpenMP: one thread
            pass
    if not threaded:
        lib = ctypes.CDLL(str(_compile(cc, FLAGS)))
    fn = lib.paged_decode_f32
    fn.restype = ctypes.c_int
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [P, P, P, P, L, P, P, I, P, I, I, I, I, I, L, L, L, ctypes.c_float]
    return lib, threaded


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call); if not, ``reason()``."""
    global _lib, _why_not, _threaded
    if _lib is None and _why_not is None:
        with _lock:
            if _lib is None and _why_not is None:
                try:
                    _lib, _threaded = _build()
                except Exception as e:               # no compiler, a failed build: the reference runs
                    _why_not = f"{type(e).__name__}: {e}"
    return _lib is not None


def shares_torch_threads() -> bool:
    """Whether the loaded kernel shares a call's rows among PyTorch's OpenMP threads (else it runs
    on the calling thread); False before the first ``available()``."""
    return _lib is not None and _threaded


def reason() -> str | None:
    """Why the kernel is not available (None when it is, or before the first ``available()``)."""
    return _why_not


def supports_shape(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel has a variant for these heads: head dim 32/64/128, 1/2/4/8 query heads per
    KV head."""
    return (head_dim in HEAD_DIMS and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads in GROUP_SIZES)


def supports(q: torch.Tensor, k: torch.Tensor, num_kv_heads: int) -> bool:
    """Whether this call has a variant: fp32 CPU tensors, q [B, H, D], keys of the same D
    (``supports_shape``)."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and k.shape[-1] == q.shape[2]
            and supports_shape(q.shape[1], num_kv_heads, q.shape[2]))


def same_layout(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can read these keys and values: one shape and one set of strides for both
    (it takes the keys' strides for the values too), each head's D values consecutive. Callers
    send other layouts (a value slice of a longer buffer, a strided head dim) to another path."""
    return v.shape == k.shape and v.stride() == k.stride() and k.stride(-1) == 1


def _run(q, k, v, Hkv, tables, starts, lens, window, bs, block_stride, token_stride, head_stride):
    """The C call; q [B, H, D], the rest already checked."""
    if not available():
        raise RuntimeError(f"the CPU decode kernel is unavailable: {_why_not}")
    if v.shape != k.shape or v.dtype != k.dtype or v.stride() != k.stride():
        raise ValueError(f"values {tuple(v.shape)} (strides {v.stride()}) are not laid out as the keys "
                         f"{tuple(k.shape)} (strides {k.stride()})")
    if k.stride(-1) != 1:
        raise ValueError("each head's D values must be consecutive (stride 1)")
    B, H, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    status = _lib.paged_decode_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), tables.stride(0),
                                   None if starts is None else starts.data_ptr(), lens.data_ptr(),
                                   _window_arg(window), out.data_ptr(), B, H, Hkv, D, bs,
                                   block_stride, token_stride, head_stride, 1.0 / math.sqrt(D))
    if status == 2:
        raise MemoryError("the CPU decode kernel could not allocate its score buffer")
    if status:
        raise ValueError(f"no CPU kernel variant for head dim {D} with {H // Hkv} query heads per KV head")
    return out


def _window_arg(window: int | None) -> int:
    """The C side's window: 0 for none."""
    if window is not None and window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {window}")
    return window or 0


def paged_decode_cpu(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, sliding_window: int | None = None,
                     heads_first: bool = False, values_checked: bool = False) -> torch.Tensor:
    """out [B, H, D] = softmax(q K^T / sqrt(D)) V for each row b over its first context_lens[b] tokens
    (its last ``sliding_window`` of them, when given), reading the pools through block_tables
    [B, max_blocks] (int32) in place: token-major [num_blocks, block_size, Hkv, D] (the engine's),
    or [num_blocks, Hkv, block_size, D] with ``heads_first`` (``PagedKVCache``'s).

    Raises RuntimeError when the kernel is unavailable, ValueError for inputs it has no variant for
    (``supports``) or that do not fit together. ``values_checked``: these same tables and lengths
    (unchanged) went through an earlier call on a pool of as many blocks, so their values are not
    read again (the engine's step calls once per layer with the same two tensors)."""
    B, H, D = q.shape
    if heads_first:
        N, Hkv, bs, _ = k_pool.shape
    else:
        N, bs, Hkv, _ = k_pool.shape
    if not supports(q, k_pool, Hkv):
        raise ValueError(f"no CPU kernel variant for q {tuple(q.shape)} {q.dtype} on a pool "
                         f"{tuple(k_pool.shape)} {k_pool.dtype}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"{B} queries, {block_tables.shape[0]} block tables, {tuple(context_lens.shape)} lengths")
    lens = context_lens.contiguous()
    if B and not values_checked:            # the C side trusts these: an index out of range reads out of bounds
        shortest, longest = (int(x) for x in torch.aminmax(lens))
        if shortest < 1:
            raise ValueError(f"every row needs a context of at least 1 token, got {shortest}")
        if longest > block_tables.shape[1] * bs:
            raise ValueError(f"a context of {longest} tokens is longer than its block table "
                             f"({block_tables.shape[1]} blocks of {bs})")
        lo, hi = (int(x) for x in torch.aminmax(block_tables))
        if lo < 0 or hi >= N:
            raise ValueError(f"block tables name blocks {lo}..{hi}; the pool has {N}")
    tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    block, second, third = k_pool.stride()[:3]
    token, head = (third, second) if heads_first else (second, third)
    return _run(q, k_pool, v_pool, Hkv, tables, None, lens, sliding_window, bs, block, token, head)


def contiguous_decode_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          starts: torch.Tensor | None = None) -> torch.Tensor:
    """out [B, H, D] for one query per row over a contiguous cache k, v [B, Hkv, S, D] (any strides,
    each head's D values consecutive: a view of a longer cache will do), row b attending to its
    positions starts[b] .. S-1 (int32 [B]; left padding before them) or to all S."""
    B, H, D = q.shape
    _, Hkv, S, _ = k.shape
    if not supports(q, k, Hkv) or k.shape[0] != B:
        raise ValueError(f"no CPU kernel variant for q {tuple(q.shape)} {q.dtype} on a cache "
                         f"{tuple(k.shape)} {k.dtype}")
    if starts is not None:
        if starts.dtype != torch.int32 or starts.shape != (B,):
            raise ValueError(f"starts must be int32 [{B}], got {starts.dtype} {tuple(starts.shape)}")
        if B and not 0 <= int(starts.min()) <= int(starts.max()) < S:
            raise ValueError(f"starts must lie in 0..{S - 1} (each row attends to at least one key)")
    tables = torch.arange(B, dtype=torch.int32)[:, None]            # one block of S tokens per row
    lens = torch.full((B,), S, dtype=torch.int32)
    return _run(q, k, v, Hkv, tables, None if starts is None else starts.contiguous(), lens, None, S,
                k.stride(0), k.stride(2), k.stride(1))

