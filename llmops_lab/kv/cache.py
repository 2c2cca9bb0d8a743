"""KVCache: a contiguous, preallocated key/value cache (one [B, Hkv, S_max, D] buffer per layer).

Its allocated bytes are exactly 2 x L x B x Hkv x D x S_max x sizeof(dtype): the KV-cache formula
with batch and grouped-query heads in it (see ``formulas.kv_cache_bytes``).
"""
from __future__ import annotations

import torch

from ..checks import is_int


def write_at(k_buf, v_buf, k, v, pos):
    """Write one new token per row, k, v [B, Hkv, 1, D], into buffers [B, Hkv, S_max, D] at slots
    pos [B] (a static-shape write: no slicing by a Python int); returns the whole buffers."""
    rows = torch.arange(k.shape[0], device=k.device)
    k_buf[rows, :, pos] = k[:, :, 0]
    v_buf[rows, :, pos] = v[:, :, 0]
    return k_buf, v_buf


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int, dtype=torch.float32, device="cpu"):
        check_dims(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, max_seq_len=max_seq_len)
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.length = 0  # tokens written so far (the same for every row; padding is masked)
        # each layer's slots 0..written-1 hold data (check_no_gap); so do 0..length-1, which whoever
        # writes the buffers directly sets (LeanModel; a timing that fakes a filled cache)
        self.written = [0] * num_layers

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None):
        c = model.config
        p = next(model.parameters())
        # None, not any falsy value, means the model's context: a 0 reaches the constructor's check.
        # More slots than the context is allowed: speculative decoding's batch caches hold holes
        return cls(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim,
                   c.max_position_embeddings if max_seq_len is None else max_seq_len,
                   dtype or p.dtype, device or p.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Write k, v [B, Hkv, S, D] at positions start..start+S; return keys/values 0..start+S.

        ``start`` may also be a LongTensor [B] of per-row positions for one new token (S = 1):
        the static-shape decode step, which then attends over the whole buffer under a mask.
        """
        check_new_kv(layer, self.k, k, v, self.batch_size)
        if torch.is_tensor(start):          # shapes only: a captured step must not read device values
            if k.shape[2] != 1 or start.shape != (k.shape[0],) or start.dtype.is_floating_point:
                raise ValueError(f"per-row positions take one token per row: k [B, Hkv, 1, D] and start "
                                 f"[B] integers; got k {tuple(k.shape)}, start {tuple(start.shape)} {start.dtype}")
            self.written[layer] = self.max_seq_len     # unknown without reading them: the mask rules
            return write_at(self.k[layer], self.v[layer], k, v, start)
        check_start(start)
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: writing up to position {end} in a cache of {self.max_seq_len}")
        check_no_gap(start, max(self.written[layer], self.length))
        self.written[layer] = max(self.written[layer], end)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every position >= length (speculative decoding rolls back rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0
        self.written = [0] * len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated for keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def check_dims(**dims) -> None:
    """Cache dimensions are integers >= 1, each named in the error (a float would fail deep inside
    torch.zeros, a bool pass as 0 or 1)."""
    for name, n in dims.items():
        if not is_int(n) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")


def check_cache_fits(cache, model) -> None:
    """ValueError unless ``cache`` holds what ``model`` writes into it: its layers, KV heads and head
    dim, in the model's dtype (an int8 cache: the dtype it hands back) and on its device. A misfit
    failed deep inside a forward (a shape or dtype error from an index_put), or not at all: a cache
    of more layers took a smaller model's keys into its first layers without a word, and one of the
    wrong dtype was written before SDPA refused it. Caches with no per-layer tensors (the document's
    sliding-window class) have nothing to compare. The model's forward calls this on every cache."""
    layers = getattr(cache, "k_pools", None) or getattr(cache, "k", None)
    if not isinstance(layers, list) or not layers or not torch.is_tensor(layers[0]):
        return
    c, t = model.config, layers[0]
    names = ("layers", "KV heads", "head dim", "dtype", "device")
    have = (len(layers), t.shape[1], t.shape[-1], getattr(cache, "dtype", t.dtype), t.device)
    want = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, model.dtype, model.device)
    wrong = [f"{n} {h} (the model's: {w})" for n, h, w in zip(names, have, want) if h != w]
    if wrong:
        raise ValueError(f"{type(cache).__name__} does not fit the model: {', '.join(wrong)}; "
                         f"{type(cache).__name__}.for_model(model, ...) makes one that does")


def check_no_gap(start: int, written: int) -> None:
    """A write may rewrite stored positions (speculative decoding rolls back and writes again) but not
    start past them: the slots between would be attended to, unwritten, without a word."""
    if start > written:
        raise ValueError(f"writing at position {start} leaves a gap: this layer holds positions 0..{written - 1}"
                         if written else f"writing at position {start} leaves a gap: this layer holds no "
                         f"positions yet (a new cache, or one after reset()); start at 0")


def check_start(start) -> None:
    """A write position must be a non-negative integer: a negative one would slice from the end of
    the buffer and write (or return) the wrong positions without a word."""
    if not is_int(start) or start < 0:
        raise ValueError(f"start must be a position >= 0, got {start!r}")


def check_new_kv(layer, buffers, k: torch.Tensor, v: torch.Tensor, batch_size: int) -> None:
    """New keys and values k, v [B, Hkv, S, D] fit a cache whose per-layer ``buffers`` are
    [B, Hkv, slots, D]: a layer index in range (-1 would be the last), the cache's batch, KV heads
    and head dim (a single head or a size-1 dim would broadcast into every slot without a word)."""
    if not is_int(layer) or not 0 <= layer < len(buffers):
        raise ValueError(f"layer must be 0..{len(buffers) - 1}, got {layer!r}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"keys and values must be [B, Hkv, S, D] and alike; got {tuple(k.shape)}, {tuple(v.shape)}")
    buf = buffers[layer]
    if k.shape[0] != batch_size:
        raise ValueError(f"batch of {k.shape[0]} rows does not match the cache's {batch_size}")
    if (k.shape[1], k.shape[3]) != (buf.shape[1], buf.shape[3]):
        raise ValueError(f"{k.shape[1]} KV heads of dim {k.shape[3]} do not match the cache's "
                         f"{buf.shape[1]} of dim {buf.shape[3]}")
