"""Device capabilities: what this machine can run, so notebooks pick a path and say why.

Every probe is guarded (a laptop without CUDA, Triton or bitsandbytes must not crash) and cached,
since notebooks ask repeatedly. SDPA backends are probed by running a tiny attention call under
``torch.nn.attention.sdpa_kernel``, because "compiled in" and "usable for these inputs" differ.
"""
from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import platform
import warnings

import torch

GPU_BENCH_COMMAND = "python -m llmops_lab.bench --device cuda"


def _version(distribution: str) -> str | None:
    """Installed version from package metadata; importing is slow and some packages print."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_gpu() -> bool:
    if not torch.cuda.is_available() or _version("triton") is None:
        return False
    try:
        from triton.runtime import driver
        driver.active.get_current_target()
        return True
    except Exception:  # any failure means "not usable here"
        return False


def _sdpa_backends(device: torch.device) -> dict[str, bool]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # Flash and efficient kernels want half precision on a GPU; fp32 is what the CPU runs.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 2, 8, 16, device=device, dtype=dtype)  # B, H, S, D
    names = {"math": "MATH", "efficient": "EFFICIENT_ATTENTION",
             "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    found = {}
    for name, member in names.items():
        backend = getattr(SDPBackend, member, None)
        if backend is None:  # not in this torch version
            found[name] = False
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            found[name] = True
        except Exception:  # "No viable backend" is a RuntimeError; be lenient across versions
            found[name] = False
    return found


def capabilities() -> dict:
    """What this machine offers: versions, GPU, Triton, SDPA backends, quantisation libraries.

    Probed once per process; each call returns a fresh copy, so callers may edit it.
    """
    return copy.deepcopy(_probe())


@functools.lru_cache(maxsize=1)
def _probe() -> dict:
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": cuda,
        "device_name": props.name if cuda else _cpu_name(),
        "compute_capability": (props.major, props.minor) if cuda else None,
        "gpu_memory_bytes": props.total_memory if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "triton": _version("triton"),
        "triton_gpu": _triton_gpu(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "sdpa_backends": _sdpa_backends(torch.device("cuda" if cuda else "cpu")),
        "bitsandbytes": _version("bitsandbytes"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "transformers": _version("transformers"),
    }


def describe() -> str:
    """A few lines summarising capabilities(), for the top of a notebook."""
    caps = capabilities()
    if caps["cuda"]:
        major, minor = caps["compute_capability"]
        gpu = (f"GPU: {caps['device_name']} (sm_{major}{minor}, "
               f"{caps['gpu_memory_bytes'] / 2**30:.1f} GiB)")
    else:
        gpu = f"GPU: none, CPU only ({caps['device_name']}, {caps['cpu_threads']} threads)"
    triton = caps["triton"] or "not installed"
    if caps["triton"]:
        modes = [m for m, on in (("GPU", caps["triton_gpu"]),
                                 ("interpreter", caps["triton_interpret"])) if on]
        triton += f" ({', '.join(modes) or 'no GPU; set TRITON_INTERPRET=1 to interpret'})"
    sdpa = ", ".join(name for name, on in caps["sdpa_backends"].items() if on) or "none"
    return "\n".join([
        f"Python {caps['python']}, torch {caps['torch']}, "
        f"transformers {caps['transformers'] or 'not installed'}",
        gpu,
        f"Triton: {triton}",
        f"SDPA backends: {sdpa}",
        f"bitsandbytes: {caps['bitsandbytes'] or 'not installed'}, "
        f"flash-attn: {caps['flash_attn'] or 'not installed'}",
    ])


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def as_device(device) -> torch.device:
    """``device`` as a torch.device (None: ``default_device()``), checked before anything uses it:
    an unknown name, or CUDA on a machine without it, is a ValueError that says so."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):   # 'meta' loaded a model with no weights; 'mps', 'xpu' are untested here
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (use 'cpu')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def fallback_message(what: str) -> str | None:
    """The sentence a notebook shows when a GPU measurement runs on the CPU instead; None on a GPU."""
    if capabilities()["cuda"]:
        return None
    return (f"No CUDA GPU here: {what} runs on the CPU; "
            f"GPU figures come from `{GPU_BENCH_COMMAND}`.")


def notify_fallback(what: str) -> str | None:
    """Print fallback_message(what) when there is no GPU (for notebook cells); return it."""
    message = fallback_message(what)
    if message is not None:
        print(message)
    return message
