"""CUDA graphs for the engine's decode steps (vLLM's default; ``EngineConfig(enforce_eager=True)``
turns them off).

An eager decode step launches every kernel of every layer from Python: a few hundred launches for
a 7B model, each costing the host more than the GPU takes to run it at a small batch. The GPU waits
on the host, and the step takes several times the few milliseconds its weight reads need. A step
in which every running sequence decodes one token has a shape set by the batch size alone, so it
can be captured once per batch size and replayed with one launch (Kwon et al. 2023 capture such
graphs in vLLM; nano-vllm's ``capture_cudagraph`` is a short reading).

What a graph needs, and how the step provides it:

- Fixed addresses: the step's inputs (token ids, RoPE positions, KV slots, context lengths, block
  tables) live in static buffers; each step copies its values in and replays.
- Fixed shapes: batch sizes are bucketed (1, 2, 4, 8, then multiples of 16). A step of B sequences
  replays the smallest bucket of at least B; the extra rows write their keys and values into a
  scratch block the block manager never hands out, attend to that one key, and their logits are
  dropped.
- No reads of device values on the host: the model's ``forward`` checks ids and positions (a
  device-to-host read each), so the graph runs ``forward_packed``, and the paged decode kernel's
  split count and context bound come from ``max_model_len``, not from this step's longest context.

``DecodeBatch`` is the model's cache for such a step. On a CPU (or with ``capture=False``) the same
buffers run eagerly, which is how the tests check the static path against the engine's ordinary one.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..attention import sdpa_attention
from ..paged.varlen import PackedBatch, store_tokens


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, 8, then every multiple of 16, up to and including max_batch."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch}
    return sorted(sizes)


class DecodeBatch:
    """The cache of a decode step over static buffers: B sequences, one new token each.

    slot_mapping [B] (pool slot of each new token), context_lens [B] int32 (keys each attends to,
    itself included), block_tables [B, max_blocks] int32. Attention reads at most
    ``max_context_len`` keys per sequence, in ``num_splits`` programs per (sequence, KV head).
    """

    packed = True
    length = 0

    def __init__(self, k_pools, v_pools, slot_mapping, context_lens, block_tables, max_context_len: int,
                 num_splits: int = 1, use_kernels: bool = True):
        self.k_pools, self.v_pools = k_pools, v_pools
        self.slot_mapping, self.context_lens, self.block_tables = slot_mapping, context_lens, block_tables
        self.max_context_len, self.num_splits, self.use_kernels = max_context_len, num_splits, use_kernels
        self._layer = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start=None):
        """Store k, v [1, Hkv, B, D] at the batch's slots; attention then reads this layer's pool."""
        store_tokens(self.k_pools[layer], k, self.slot_mapping)
        store_tokens(self.v_pools[layer], v, self.slot_mapping)
        self._layer = layer
        return self, self

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [1, H, B, D] -> [1, H, B, D]."""
        kp, vp = self.k_pools[self._layer], self.v_pools[self._layer]
        qd = q[0].transpose(0, 1)                                              # [B, H, D]
        if self.use_kernels:
            from ..paged.triton_paged import paged_decode
            out = paged_decode(qd, PackedBatch._heads_first(kp), PackedBatch._heads_first(vp), self.block_tables,
                               self.context_lens, num_splits=self.num_splits, max_context_len=self.max_context_len)
        else:                      # the reference: gather every table's blocks, mask past each length
            L = self.max_context_len
            k, v = (PackedBatch._gather(p, self.block_tables, L) for p in (kp, vp))   # [B, Hkv, L, D]
            valid = torch.arange(L, device=qd.device)[None, :] < self.context_lens[:, None]
            out = sdpa_attention(qd[:, :, None], k, v, mask=valid[:, None, None, :])[:, :, 0]
        return out.transpose(0, 1)[None]


def decode_batch_attention(q, k, v, mask=None, is_causal=False):
    """The attention backend for a ``DecodeBatch`` cache (its ``update`` returned the batch itself)."""
    return k.attend(q)


class DecodeGraphs:
    """Static input buffers and one captured decode step per batch bucket.

    ``scratch_block``: a pool block outside the block manager's range, where padding rows write.
    ``capture``: record CUDA graphs (needs CUDA); without it the buffers run eagerly.
    """

    def __init__(self, model, k_pools, v_pools, block_size: int, max_batch: int, max_model_len: int,
                 scratch_block: int, use_kernels: bool = True, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.k_pools, self.v_pools = model, k_pools, v_pools
        self.block_size, self.max_model_len, self.use_kernels = block_size, max_model_len, use_kernels
        self.max_blocks = math.ceil(max_model_len / block_size)
        self.scratch_slot = scratch_block * block_size
        self.sizes = batch_buckets(max_batch)
        dev = model.device
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), self.scratch_slot, dtype=torch.long, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.tables = torch.full((max_batch, self.max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.scratch_block = scratch_block
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _splits(self, B: int) -> int:
        if not self.use_kernels:
            return 1
        from ..paged.triton_paged import BLOCK_N, _default_splits
        return _default_splits(self.model.device, B * self.model.config.num_key_value_heads,
                               self.max_model_len, BLOCK_N)

    def _forward(self, B: int) -> torch.Tensor:
        batch = DecodeBatch(self.k_pools, self.v_pools, self.slots[:B], self.lens[:B], self.tables[:B],
                            self.max_model_len, self._splits(B), self.use_kernels)
        return self.model.forward_packed(self.ids[None, :B], self.positions[None, :B], batch,
                                         decode_batch_attention)[0]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None                      # the graphs share one memory pool, largest captured first
        for B in tqdm(list(reversed(self.sizes)), desc="capturing CUDA graphs", leave=False,
                      disable=len(self.sizes) < 8):
            self._forward(B)             # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[B] = self._forward(B)
            pool = g.pool() if pool is None else pool
            self.graphs[B] = g
        torch.cuda.synchronize()

    def run(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int],
            tables: list[list[int]]) -> torch.Tensor:
        """One decode step of len(ids) <= max_batch sequences; logits [B, vocab] in batch order."""
        B = len(ids)
        bucket = next(s for s in self.sizes if s >= B)
        pad = bucket - B
        width = max(len(t) for t in tables)
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad,
                             lens + [1] * pad], dtype=torch.long)
        self.ids[:bucket].copy_(host[0], non_blocking=True)
        self.positions[:bucket].copy_(host[1], non_blocking=True)
        self.slots[:bucket].copy_(host[2], non_blocking=True)
        self.lens[:bucket].copy_(host[3], non_blocking=True)
        # Entries past a sequence's length are never read, so only the used width is refreshed;
        # a padding row's one key is slot 0 of the scratch block.
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables] + [[self.scratch_block] * width] * pad
        self.tables[:bucket, :width].copy_(torch.tensor(rows, dtype=torch.int32), non_blocking=True)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            out = self.logits[bucket]
        else:
            out = self._forward(bucket)
        return out[:B]
