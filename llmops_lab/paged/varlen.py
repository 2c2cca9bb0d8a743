"""Attention over a packed (flattened) batch of sequences on the paged KV cache.

Continuous batching runs prefill chunks and decodes of many sequences in one forward pass: their
tokens are concatenated into one row of T tokens, with no padding (Yu et al. 2022, Orca's
selective batching; vLLM's varlen metadata). The linear layers see [1, T, d] and do not care whose
token is whose; only attention does. ``PackedBatch`` carries that knowledge, passed explicitly
to the model as its ``cache``: where each token's K/V goes (``slot_mapping``), which tokens belong
to which sequence (``query_start``), how long each sequence's context is, and its block table.

Sequences computing one token (decodes) are attended together in one call (the Triton paged decode
kernel on a GPU, the C kernel of ``cpu_kernel`` on a CPU); each prefill chunk attends causally to its
sequence's cached context plus itself (the Triton paged prefill kernel on a GPU). Otherwise (a CPU
prefill, a sliding window on a GPU, a CPU without a C compiler) the references gather the blocks
and run SDPA.

The pools here are *token-major*, [num_blocks, block_size, Hkv, D]: a token's keys for all heads
are one row, so storing T new tokens is one ``index_copy_`` and gathering a sequence's blocks is
one ``index_select`` whose result is already [B, L, Hkv, D] (SDPA takes its transpose as a view).
The Triton kernels read the same memory through a permuted view (they take strides).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import sdpa_attention
from . import cpu_kernel


def store_tokens(pool: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, keep: torch.Tensor | None = None):
    """Write the keys (or values) of T tokens, new [1, Hkv, T, D], into a token-major pool at
    ``slots`` [T] (only the tokens at indices ``keep``, when given: slots holds theirs alone)."""
    rows = new[0].transpose(0, 1).reshape(new.shape[2], -1)                  # [T, Hkv*D]
    if keep is not None:
        rows = rows[keep]
    pool.view(-1, rows.shape[1]).index_copy_(0, slots, rows)


@dataclass
class PackedBatch:
    """A packed batch's attention metadata and the pools it writes to; the model's ``cache``."""

    k_pools: list[torch.Tensor]       # per layer [num_blocks, block_size, Hkv, D] (token-major)
    v_pools: list[torch.Tensor]
    slot_mapping: torch.Tensor        # [T] int64: pool slot of each token (-1: already cached, skip)
    query_start: list[int]            # [B + 1]: sequence b's tokens are query_start[b]:query_start[b+1]
    context_lens: list[int]           # [B]: tokens of context each sequence attends to, itself included
    block_tables: torch.Tensor        # [B, max_blocks] int32, padded with 0
    sliding_window: int | None = None
    use_kernels: bool = False         # Triton kernels (CUDA) or the gather references
    cpu_kernel: bool = True           # CPU decodes: the C kernel (cpu_kernel) where it has a variant
    packed = True
    length = 0                        # the model reads cache.length as the start; unused when packed

    def __post_init__(self):
        B = len(self.context_lens)
        q = self.query_start
        dev = self.slot_mapping.device
        self.decode_rows = [b for b in range(B) if q[b + 1] - q[b] == 1]
        self.prefill_rows = [b for b in range(B) if q[b + 1] - q[b] > 1]
        self.all_decode = len(self.decode_rows) == B
        self._lens = torch.tensor(self.context_lens, dtype=torch.int32, device=dev)
        keep = self.slot_mapping >= 0                        # -1: KV already in a prefix-cached block
        self._write = None if bool(keep.all()) else keep.nonzero()[:, 0]
        self._slots = self.slot_mapping if self._write is None else self.slot_mapping[self._write]
        if self.decode_rows:                                 # shared by every layer of the step
            rows = self.decode_rows
            self._decode_tokens = torch.tensor([q[b] for b in rows], dtype=torch.long, device=dev)
            self._dec_tables = self.block_tables if self.all_decode else self.block_tables[rows]
            self._dec_lens = self._lens if self.all_decode else self._lens[rows]
            self._dec_L = max(self.context_lens[b] for b in rows)
            self._dec_mask = None                            # the reference's, made on first use
        self.cpu_kernel_calls = 0                            # decode attentions the C kernel ran
        self._layer = None
        self._rows = {}                                      # _row_metadata's copies, by row

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start=None):
        """Store the batch's new keys and values k, v [1, Hkv, T, D] into their slots; attention then
        reads the pool of this layer (returned as both 'keys' and 'values')."""
        for new, pool in ((k, self.k_pools[layer]), (v, self.v_pools[layer])):
            store_tokens(pool, new, self._slots, self._write)
        self._layer, self._k, self._v = layer, k, v
        return self, self

    # -- attention --------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, D] -> [1, H, T, D]: every token attends to its own sequence's context."""
        kp, vp = self.k_pools[self._layer], self.v_pools[self._layer]
        if self.all_decode:
            return self._decode(q[0].transpose(0, 1), kp, vp).transpose(0, 1)[None]
        out = torch.empty_like(q)
        if self.decode_rows:
            qd = q[0][:, self._decode_tokens].transpose(0, 1)                   # [Bd, H, D]
            out[0][:, self._decode_tokens] = self._decode(qd, kp, vp).transpose(0, 1)
        for b in self.prefill_rows:
            s, e = self.query_start[b], self.query_start[b + 1]
            out[:, :, s:e] = self._prefill(q[:, :, s:e], kp, vp, b)
        return out

    @staticmethod
    def _heads_first(pool):
        """The [num_blocks, Hkv, block_size, D] view the Triton kernels expect."""
        return pool.permute(0, 2, 1, 3)

    @staticmethod
    def _gather(pool, tables, length):
        """[B, Hkv, length, D] (a view of one gathered copy) of each table's blocks."""
        N, bs, Hkv, D = pool.shape
        n = -(-length // bs)
        x = pool.view(N, -1).index_select(0, tables[:, :n].reshape(-1).long())
        return x.view(tables.shape[0], n * bs, Hkv, D)[:, :length].transpose(1, 2)

    def _decode(self, q, kp, vp):
        if self.use_kernels and self.sliding_window is None:
            from .triton_paged import paged_decode
            return paged_decode(q, self._heads_first(kp), self._heads_first(vp), self._dec_tables,
                                self._dec_lens, max_context_len=self._dec_L)
        if self.cpu_kernel and not self.use_kernels:
            if cpu_kernel.supports(q, kp, kp.shape[2]) and cpu_kernel.available():
                # every layer's pool has as many blocks, and the step's tables and lengths never change
                out = cpu_kernel.paged_decode_cpu(q, kp, vp, self._dec_tables, self._dec_lens, self.sliding_window,
                                                  values_checked=self.cpu_kernel_calls > 0)
                self.cpu_kernel_calls += 1
                return out
        return self._decode_reference(q, kp, vp)

    def _decode_reference(self, q, kp, vp):
        """Gather each row's blocks into one padded copy, SDPA over it with a mask of each row's
        length (and window)."""
        if self._dec_mask is None:
            kpos = torch.arange(self._dec_L, device=q.device)[None, :]
            valid = kpos < self._dec_lens[:, None]
            if self.sliding_window is not None:
                valid &= kpos >= self._dec_lens[:, None] - self.sliding_window
            self._dec_mask = valid[:, None, None, :]
        k, v = (self._gather(p, self._dec_tables, self._dec_L) for p in (kp, vp))
        return sdpa_attention(q[:, :, None], k, v, mask=self._dec_mask)[:, :, 0]

    def _row_metadata(self, b: int):
        """Row b's block table [1, max_blocks] and context length [1] for the prefill kernel, copied
        once a step (every layer reuses them). Slices of the batch's tensors would start at 4-byte
        offsets, and Triton compiles one variant of a kernel per pointer alignment it meets: a
        prefill in row 1 after one in row 0 would compile the kernel again inside a served step."""
        if b not in self._rows:
            self._rows[b] = (self.block_tables[b:b + 1].clone(), self._lens[b:b + 1].clone())
        return self._rows[b]

    def _prefill(self, q, kp, vp, b):
        ctx, n = self.context_lens[b], q.shape[2]
        if ctx == n and self.sliding_window is None:   # a whole prompt: its keys are this chunk's own
            s, e = self.query_start[b], self.query_start[b + 1]
            return sdpa_attention(q, self._k[:, :, s:e], self._v[:, :, s:e], is_causal=True)
        if self.use_kernels and self.sliding_window is None:
            from .triton_prefill import paged_prefill
            return paged_prefill(q, self._heads_first(kp), self._heads_first(vp), *self._row_metadata(b))
        table = self.block_tables[b:b + 1]
        k, v = (self._gather(p, table, ctx) for p in (kp, vp))                # [1, Hkv, ctx, D]
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        allowed = kpos <= qpos
        if self.sliding_window is not None:
            allowed &= kpos > qpos - self.sliding_window
        return sdpa_attention(q, k, v, mask=allowed[None, None])


def packed_paged_attention(q, k, v, mask=None, is_causal=False):
    """The runtime backend for a ``PackedBatch`` cache (its ``update`` returned the batch itself)."""
    if not isinstance(k, PackedBatch):
        raise TypeError("packed_paged_attention runs with a PackedBatch as the model's cache")
    return k.attend(q)
