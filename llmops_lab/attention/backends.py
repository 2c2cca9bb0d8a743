"""Two reference attention backends: the naive math and PyTorch's scaled_dot_product_attention.

The naive one materialises the full [B, H, Sq, Sk] score matrix (Vaswani et al. 2017), which is
exactly what flash attention avoids; SDPA dispatches to a fused kernel where it can.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False) -> None:
    """Shapes, and what every backend must agree on: a boolean mask (True = attend; SDPA would read
    a float one as an additive bias, the naive backend could not read it at all), a mask or
    ``is_causal``, not both, one floating dtype for q, k and v, at least one query and one key, and a causal pass
    with no more queries than keys (aligned bottom right: query i sees the keys up to i + Sk - Sq;
    more queries would leave rows with no key at all). Shapes and dtypes only: the engine's steps
    call this, so it never reads a tensor's values (on a GPU that would wait for the device). A mask
    row with every key masked is refused by ``naive_attention`` alone (softmax over nothing: NaN
    there, zeros from SDPA)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    # Broadcast by matmul and SDPA: a q of batch 1 against k, v of batch 3 gave 3 rows, no error.
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    # The naive and tiled backends upcast and cast back to q's dtype: mixed inputs came back in q's
    # dtype and integer inputs truncated to nonsense, where SDPA and the flash kernel refuse both.
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[1] != v.shape[1]:  # SDPA's enable_gqa broadcast a single value head over two key heads
        raise ValueError(f"key and value heads differ: {k.shape[1]} vs {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[-1] == 0:
        raise ValueError(f"attention needs at least one key/value head and a head dim of at least 1; "
                         f"got {k.shape[1]} heads, head dim {q.shape[-1]}")
    if q.shape[-1] != k.shape[-1] or k.shape[-1] != v.shape[-1]:
        raise ValueError(f"head dims differ: q {q.shape[-1]}, k {k.shape[-1]}, v {v.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"key and value lengths differ: {k.shape[-2]} vs {v.shape[-2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[-2] == 0:
        raise ValueError("attention needs at least one key")
    if q.shape[-2] == 0:     # naive and SDPA gave an empty tensor back, tiled and flash refused it
        raise ValueError("empty sequence: attention needs at least one query")
    if mask is not None and (not torch.is_tensor(mask) or mask.dtype != torch.bool):
        raise TypeError(f"mask must be a boolean tensor (True = attend), got "
                        f"{mask.dtype if torch.is_tensor(mask) else type(mask).__name__}")
    if mask is not None and is_causal:  # the backends read the mask alone and dropped is_causal unseen
        raise ValueError("pass a mask or is_causal=True, not both: fold the causal condition into the mask "
                         "(causal_mask(Sq, Sk) & mask)")
    if is_causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"causal attention with more queries ({q.shape[-2]}) than keys ({k.shape[-2]}) "
                         f"leaves rows with no key")


def causal_mask(Sq: int, Sk: int, device=None) -> torch.Tensor:
    """[Sq, Sk] boolean, True where query i may see key j: j <= i + Sk - Sq (the last query sees
    every key: new queries after a cached prefix)."""
    return torch.ones(Sq, Sk, dtype=torch.bool, device=device).tril(Sk - Sq)


def naive_attention(q, k, v, mask=None, is_causal=False):
    """softmax(Q K^T / sqrt(D)) V with the S x S score matrix in memory (fp32 softmax)."""
    _check(q, k, v, mask, is_causal)
    # A row with no key to attend to: NaN here, zeros from SDPA. This reads the mask (a device sync
    # on a GPU), which the reference may do and _check, on the engine's path, may not.
    if mask is not None and not bool(mask.any(-1).all()):
        raise ValueError("mask leaves a query with no key to attend to (a row of the mask is all False)")
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # grouped-query: each KV head serves n_rep query heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    Sq, Sk = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, Sq, Sk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif is_causal:
        scores = scores.masked_fill(~causal_mask(Sq, Sk, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v.float()).to(q.dtype)


def sdpa_attention(q, k, v, mask=None, is_causal=False):
    """PyTorch's fused attention; it picks flash, memory-efficient, cuDNN or math by itself.

    One query token per row with grouped-query heads on a CPU takes ``fold_gqa_queries``. A causal
    pass with fewer queries than keys gets an explicit mask: SDPA's own ``is_causal`` aligns the
    first query with the first key, where the other backends align the last with the last."""
    _check(q, k, v, mask, is_causal)
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    if is_causal and mask is None and Sq != k.shape[2]:
        mask, is_causal = causal_mask(Sq, k.shape[2], q.device), False
    one_mask = mask is None or (mask.dim() == 4 and mask.shape[1] == 1)          # the same for every head
    if Sq == 1 and H != Hkv and q.device.type == "cpu" and not is_causal and one_mask:
        return fold_gqa_queries(q, k, v, mask)
    gqa = H != Hkv
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          is_causal=is_causal and mask is None, enable_gqa=gqa)


def fold_gqa_queries(q, k, v, mask=None):
    """A decode step's attention with grouped-query heads, q [B, H, 1, D], as n_rep queries on each
    key/value head: q viewed as [B, Hkv, n_rep, D] against k, v [B, Hkv, Sk, D] (the grouping
    FlashInfer and vLLM's decode kernels use). The same arithmetic as SDPA's ``enable_gqa``, and
    on a CPU about twice as fast: with 8 query heads on 2 KV heads and 16 rows of 257 keys, 89 us a
    call folded against 168 us through ``enable_gqa`` (this project's 2-core CPU, torch 2.13; an
    engine or static decode step of the embedded target 0.4-0.6 ms faster of about 9; measured
    while writing this and not kept as files, and no bench command repeats it). On a GPU this is
    unmeasured, so ``sdpa_attention`` folds on a CPU only.
    ``mask`` [B or 1, 1, 1, Sk] (one mask for all heads) broadcasts over the folded queries."""
    B, H, _, D = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], D), k, v, attn_mask=mask)
    return out.reshape(B, H, 1, D)


def cpu_decode_attention(q, k, v, mask=None, is_causal=False):
    """``sdpa_attention``, except where one query token per row attends in fp32 on a CPU, with no
    mask or a mask that keeps a suffix of each row's keys (left padding, a sliding window): there
    the C decode kernel reads the cache in place (``paged.cpu_kernel.contiguous_decode_cpu``, the
    kernel the engine's paged decode runs on a CPU, sharing rows among PyTorch's threads). For rows
    of equal length a whole static decode step of the embedded target is as fast or faster through
    SDPA (16 rows of 256 tokens, four CPU batching bench runs of 2026-11-27, printed then and not
    kept as files: 13.7-15.8 ms through SDPA, 14.8-18.1 ms through the kernel, which also pays for
    turning the mask into row starts in every layer; ``python -m llmops_lab.bench --only batching``
    on a CPU records both in its row), so static batching keeps SDPA; the batching bench times its
    decode step both ways.
    Inputs are checked first, as in every backend: the kernel's own refusals named the wrong cause."""
    _check(q, k, v, mask, is_causal)
    if q.shape[2] == 1 and not is_causal and q.device.type == "cpu":
        from ..paged import cpu_kernel
        if (cpu_kernel.same_layout(k, v) and cpu_kernel.supports(q[:, :, 0], k, k.shape[1])
                and cpu_kernel.available()):
            starts = suffix_starts(mask, q.shape[0], k.shape[2])
            if starts is not False:
                return cpu_kernel.contiguous_decode_cpu(q[:, :, 0], k, v, starts)[:, :, None]
    return sdpa_attention(q, k, v, mask, is_causal)


def suffix_starts(mask, B: int, S: int):
    """For a boolean key mask [B or 1, 1, 1, S] whose True entries are a suffix of each row (keys
    starts[b]..S-1), those starts (int32 [B]); None for no mask; False for any other mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != S:
        return False
    rows = mask[:, 0, 0].expand(B, S)
    starts = (S - rows.sum(-1)).to(torch.int32)
    if not torch.equal(rows, torch.arange(S, device=mask.device)[None, :] >= starts[:, None]):
        return False
    return starts


BACKENDS: dict[str, Callable] = {"naive": naive_attention, "sdpa": sdpa_attention,
                                 "cpu_decode": cpu_decode_attention}


def get_backend(name_or_fn: str | Callable) -> Callable:
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn == "flash":  # imported on demand: it needs triton
        from .triton_flash import flash_attention
        return flash_attention
    if name_or_fn == "tiled":  # imported on demand: tiled.py imports this module
        from .tiled import tiled_attention
        return tiled_attention
    try:
        return BACKENDS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown attention backend {name_or_fn!r}; "
                         f"known: {sorted(BACKENDS) + ['flash', 'tiled']}") from None
