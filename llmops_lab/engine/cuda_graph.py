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
With ``fused`` the captured layers run their elementwise ops as one Triton kernel each
(``fused_ops``; ``EngineConfig(fused_ops=True)``, a candidate).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..attention import sdpa_attention
from ..paged.varlen import PackedBatch, store_tokens


def staged(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host tensors about to be copied to ``device``, in pinned memory when it is a GPU: a copy from
    pageable memory waits for the GPU to go idle, which a step launched behind the previous one
    (async scheduling) must not."""
    return tuple(t.pin_memory() for t in tensors) if device.type == "cuda" else tensors


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


class _BucketGraphs:
    """One CUDA graph per bucket size (``self.sizes``), captured largest first in one memory pool and
    replayed on static buffers; a subclass gives ``_forward(bucket)``, the step to capture."""

    graphs: dict[int, torch.cuda.CUDAGraph]
    logits: dict[int, torch.Tensor]

    @torch.inference_mode()
    def _capture_all(self, desc: str) -> None:
        pool = None                      # the graphs share one memory pool, largest captured first
        for size in tqdm(list(reversed(self.sizes)), desc=desc, leave=False, disable=len(self.sizes) < 8):
            self._forward(size)          # warm-up: Triton compiles, cuBLAS and SDPA pick their kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[size] = self._forward(size)
            pool = g.pool() if pool is None else pool
            self.graphs[size] = g
        torch.cuda.synchronize()

    def _replay(self, size: int) -> torch.Tensor:
        """The bucket's logits: its graph replayed, or (not captured: a CPU, the tests) run eagerly."""
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size]
        return self._forward(size)


class DecodeGraphs(_BucketGraphs):
    """Static input buffers and one captured decode step per batch bucket.

    ``scratch_block``: a pool block outside the block manager's range, where padding rows write.
    ``capture``: record CUDA graphs (needs CUDA); without it the buffers run eagerly.
    """

    def __init__(self, model, k_pools, v_pools, block_size: int, max_batch: int, max_model_len: int,
                 scratch_block: int, use_kernels: bool = True, capture: bool = True, fused: bool = False):
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.k_pools, self.v_pools, self.fused = model, k_pools, v_pools, fused
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
        self.graphs, self.logits = {}, {}
        if capture:
            self._capture_all("capturing CUDA graphs")

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
                                         decode_batch_attention, fused=self.fused)[0]

    def run(self, ids: list[int], positions: list[int], slots: list[int], lens: list[int],
            tables: list[list[int]], feed: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """One decode step of len(ids) <= max_batch sequences; logits [B, vocab] in batch order.
        ``feed`` (async scheduling): (tokens on the device, rows): row i's token id is
        ``tokens[rows[i]]`` where rows[i] >= 0 (its entry in ``ids`` is a placeholder)."""
        B = len(ids)
        bucket = next(s for s in self.sizes if s >= B)
        pad = bucket - B
        width = max(len(t) for t in tables)
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad,
                             lens + [1] * pad] + ([feed[1] + [-1] * pad] if feed else []), dtype=torch.long)
        rows = [t + [self.scratch_block] * (width - len(t)) for t in tables] + [[self.scratch_block] * width] * pad
        host, table = staged(self.ids.device, host, torch.tensor(rows, dtype=torch.int32))
        self.ids[:bucket].copy_(host[0], non_blocking=True)
        self.positions[:bucket].copy_(host[1], non_blocking=True)
        self.slots[:bucket].copy_(host[2], non_blocking=True)
        self.lens[:bucket].copy_(host[3], non_blocking=True)
        # Entries past a sequence's length are never read, so only the used width is refreshed;
        # a padding row's one key is slot 0 of the scratch block.
        self.tables[:bucket, :width].copy_(table, non_blocking=True)
        if feed is not None:           # tokens the previous step sampled, still on the device
            src = host[4].to(self.ids.device, non_blocking=True)
            ids = self.ids[:bucket]
            ids.copy_(torch.where(src >= 0, feed[0][src.clamp(min=0)], ids))
        return self._replay(bucket)[:B]


# -- prefill graphs (a candidate, EngineConfig(prefill_graphs=True)) ----------------------------------

def token_buckets(max_tokens: int) -> list[int]:
    """The token counts prefill graphs are captured for: 16, 32, 48, 64, 96, 128, ... (each a power
    of two or 1.5 times one), up to and including max_tokens."""
    sizes, t = [], 16
    while t < max_tokens:
        sizes += [t] + ([t * 3 // 2] if t * 3 // 2 < max_tokens and t >= 32 else [])
        t *= 2
    return sorted(set(sizes) | {max_tokens})


class PrefillBatch:
    """The cache of a graphed prefill: whole prompts packed into T tokens (padding at the end), each
    attending causally to its own tokens only, so nothing is read from the pools; the keys and
    values are stored into them at ``slot_mapping`` for the decodes that follow. ``segments`` [T]
    numbers each token's prompt (padding: -1, a causal run of its own, so no row is all masked)."""

    packed = True
    length = 0

    def __init__(self, k_pools, v_pools, slot_mapping, segments):
        self.k_pools, self.v_pools, self.slot_mapping = k_pools, v_pools, slot_mapping
        pos = torch.arange(segments.shape[0], device=segments.device)
        self.mask = ((segments[:, None] == segments[None, :]) & (pos[:, None] >= pos[None, :]))[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start=None):
        store_tokens(self.k_pools[layer], k, self.slot_mapping)
        store_tokens(self.v_pools[layer], v, self.slot_mapping)
        self._k, self._v = k, v
        return self, self

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        return sdpa_attention(q, self._k, self._v, mask=self.mask)


class PrefillGraphs(_BucketGraphs):
    """Whole new prompts (no cached prefix, no chunk) computed by a captured graph per token bucket.

    Why: a step that computes prompt tokens cannot replay a decode graph, and an eager forward of a
    7B model spends more host time launching kernels than the GPU spends on a short prompt (the
    H100 run of 2026-11-26: mixed steps 119 ms against 13 ms for a graphed decode step). Here such a
    step becomes two replays, this graph for its prompts and ``DecodeGraphs``' for its decodes, at
    the price of reading the weights twice. vLLM's answer is piecewise graphs around attention;
    this is the smaller one for prompts that attend only to themselves. A candidate: the engine
    takes it only when asked (``EngineConfig(prefill_graphs=True)``), until a GPU has timed it.

    ``max_tokens``: the largest packed prompt total captured (bigger steps run eagerly);
    ``max_prompts``: rows of logits (one per prompt) each replay returns.
    """

    def __init__(self, model, k_pools, v_pools, scratch_slot: int, max_tokens: int, max_prompts: int,
                 capture: bool = True, fused: bool = False):
        if capture and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if max_tokens < 1 or max_prompts < 1:
            raise ValueError(f"max_tokens and max_prompts must be >= 1, got {max_tokens}, {max_prompts}")
        self.model, self.k_pools, self.v_pools, self.scratch_slot = model, k_pools, v_pools, scratch_slot
        self.fused = fused
        self.sizes = token_buckets(max_tokens)
        self.max_prompts = max_prompts
        dev = model.device
        T = self.sizes[-1]
        self.ids = torch.zeros(T, dtype=torch.long, device=dev)
        self.positions = torch.zeros(T, dtype=torch.long, device=dev)
        self.slots = torch.full((T,), scratch_slot, dtype=torch.long, device=dev)
        self.segments = torch.full((T,), -1, dtype=torch.long, device=dev)
        self.last = torch.zeros(max_prompts, dtype=torch.long, device=dev)    # each prompt's last token
        self.graphs, self.logits = {}, {}
        if capture:
            self._capture_all("capturing prefill graphs")

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def _forward(self, T: int) -> torch.Tensor:
        batch = PrefillBatch(self.k_pools, self.v_pools, self.slots[:T], self.segments[:T])
        return self.model.forward_packed(self.ids[None, :T], self.positions[None, :T], batch,
                                         decode_batch_attention, logits_indices=self.last, fused=self.fused)[0]

    def run(self, prompts: list[list[int]], slots: list[list[int]]) -> torch.Tensor:
        """Compute len(prompts) <= max_prompts whole prompts (sum of lengths <= max_tokens), storing
        their keys and values at ``slots`` (one list per prompt); logits [len(prompts), vocab] at
        each prompt's last token."""
        n = sum(len(p) for p in prompts)
        if not prompts or len(prompts) > self.max_prompts or n > self.max_tokens:
            raise ValueError(f"{len(prompts)} prompts of {n} tokens; this holds 1-{self.max_prompts} "
                             f"prompts of at most {self.max_tokens} tokens")
        T = next(s for s in self.sizes if s >= n)
        ids, pos, slot, seg, last = [], [], [], [], []
        for i, (p, sl) in enumerate(zip(prompts, slots)):
            ids += p
            pos += range(len(p))
            slot += sl
            seg += [i] * len(p)
            last.append(len(ids) - 1)
        pad = T - n
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slot + [self.scratch_slot] * pad,
                             seg + [-1] * pad], dtype=torch.long)
        host, lasts = staged(self.ids.device, host,
                             torch.tensor(last + [0] * (self.max_prompts - len(last)), dtype=torch.long))
        self.ids[:T].copy_(host[0], non_blocking=True)
        self.positions[:T].copy_(host[1], non_blocking=True)
        self.slots[:T].copy_(host[2], non_blocking=True)
        self.segments[:T].copy_(host[3], non_blocking=True)
        self.last.copy_(lasts, non_blocking=True)
        return self._replay(T)[:len(prompts)]
