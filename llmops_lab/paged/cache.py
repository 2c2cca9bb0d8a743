"""PagedKVCache: the runtime's KV cache as a pool of fixed-size blocks, driven by the BlockManager.

Kwon et al. 2023 (PagedAttention, vLLM). Per layer one K pool and one V pool of
[num_blocks, Hkv, block_size, D]; each batch row is a ``Sequence`` whose block table the
``BlockManager`` keeps (plain Python: free list, reference counts, copy-on-write, prefix caching).
This class is the model runner's half: it turns block tables into a slot mapping once per forward,
writes new keys and values into their slots, copies blocks when the manager asks (copy-on-write),
and hands attention either gathered contiguous K/V (any backend) or the pool itself
(``attention="kernel"``: the Triton kernels read through the block table; use the
``paged_attention`` backend).

It plugs into ``LlamaModel.forward`` like ``KVCache``; the caller gives the sequences their tokens
first (``add_prompts`` before prefill, ``append_tokens`` before each decode step), so the manager
can hash full blocks and allocate. Every row has the same length here (no padding); the
continuous-batching engine calls the kernel with per-sequence lengths directly.
"""
from __future__ import annotations

import torch

from ..engine import BlockManager, NoFreeBlocksError, Sequence
from ..kv.cache import check_cache_fits, check_dims, check_new_kv
from .attention import PagedView, gather_kv, store_kv


class PagedKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype=torch.float32, device="cpu", enable_prefix_caching: bool = True,
                 attention: str = "gather"):
        check_dims(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        if attention not in ("gather", "kernel"):
            raise ValueError(f"attention must be 'gather' or 'kernel', got {attention!r}")
        # track_computed: a full block serves later prompts only once a forward has written its KV
        # (mark_computed in update); a forward that fails partway must not leave zeros to be reused
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching,
                                          track_computed=True)  # validates both sizes
        self.block_size, self.attention = block_size, attention
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.seqs: list[Sequence] = []      # the batch rows the next forward runs
        self.live: list[Sequence] = []      # every sequence holding blocks (for free and checks)
        self.cached_tokens: list[int] = []  # per row: leading tokens whose KV was found in the pool
        self.length = 0                     # tokens of each row already in the cache (set by the model)
        self.max_model_len = None           # the model's context, where for_model knows it
        self._meta = None

    @classmethod
    def for_model(cls, model, batch_size: int = 1, num_blocks: int | None = None, block_size: int = 16,
                  dtype=None, device=None, **kwargs):
        """A pool for ``model``; by default as many blocks as ``batch_size`` full-context sequences
        need (the memory ``KVCache.for_model(model, batch_size)`` takes, give or take one block)."""
        check_dims(batch_size=batch_size)
        c = model.config
        p = next(model.parameters())
        if num_blocks is None:
            num_blocks = batch_size * -(-c.max_position_embeddings // max(block_size, 1))
        cache = cls(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks, block_size,
                    dtype or p.dtype, device or p.device, **kwargs)
        cache.max_model_len = c.max_position_embeddings
        return cache

    def check_model(self, model) -> None:
        """ValueError unless this pool holds what ``model`` writes: its layers, KV heads and head dim,
        in the dtype and on the device of its weights (a forward would fail deep inside, after the
        prompts had taken their blocks)."""
        check_cache_fits(self, model)

    # -- bookkeeping the caller drives ----------------------------------------------------------
    def add_prompts(self, input_ids) -> int:
        """Start a batch: one new sequence per row of input_ids [B, S], blocks allocated (prefix
        cache first). Returns how many leading tokens the forward can skip (their KV is already
        in the pool for every row); at least the last token is always run, for its logits."""
        rows = input_ids.tolist() if torch.is_tensor(input_ids) else [list(r) for r in input_ids]
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("add_prompts needs one or more rows of the same length (no padding)")
        # the forward would refuse it after the blocks were taken, and they would stay held
        if self.max_model_len is not None and len(rows[0]) > self.max_model_len:
            raise ValueError(f"prompts of {len(rows[0])} tokens exceed the model's context of "
                             f"{self.max_model_len}")
        bm = self.block_manager
        seqs = [Sequence(r) for r in rows]
        # All rows or none, checked before anything is allocated: a block that was allocated and
        # handed back uncomputed would stay registered in the prefix cache with no KV in it.
        # Hits on blocks other sequences hold are free; counting only those is conservative.
        need = sum(bm.blocks_needed(s) - bm._shared_hits(s) for s in seqs)
        if need > bm.num_free_blocks:
            raise NoFreeBlocksError(f"{len(rows)} prompts need {need} blocks, {bm.num_free_blocks} free")
        # rows may share each other's new blocks (identical prompts): one forward computes them all
        cached, computing = [], set()
        for s in seqs:
            cached.append(bm.allocate(s, computing))
            computing.update(s.block_table)
        self.live += seqs
        self.seqs, self.cached_tokens = seqs, cached
        self.length = min(min(cached), len(rows[0]) - 1)
        return self.length

    def append_tokens(self, tokens) -> None:
        """Give each row's new token (tokens [B]) a slot before the forward that computes its KV;
        blocks shared with a fork are copied first (copy-on-write). Raises NoFreeBlocksError,
        changing nothing, when the pool cannot hold the step."""
        tokens = tokens.tolist() if torch.is_tensor(tokens) else list(tokens)
        if len(tokens) != len(self.seqs):
            raise ValueError(f"{len(tokens)} tokens for {len(self.seqs)} rows")
        longest = max((len(s) for s in self.seqs), default=0)
        if self.max_model_len is not None and longest + 1 > self.max_model_len:
            # as add_prompts: the forward would refuse the step after its slots were taken
            raise ValueError(f"a row of {longest} tokens has no room for another in the model's "
                             f"context of {self.max_model_len}")
        need = blocks_for_step(self.block_manager, self.seqs)
        if need > self.block_manager.num_free_blocks:
            raise NoFreeBlocksError(f"the next step needs {need} blocks, {self.block_manager.num_free_blocks} free")
        copies = []
        for s, t in zip(self.seqs, tokens):
            s.append_token(t)
            copy = self.block_manager.append_slot(s)
            if copy is not None:
                copies.append(copy)
        if copies:
            self.copy_blocks(copies)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy block src -> dst in every layer's pools (the copy half of copy-on-write)."""
        src = torch.tensor([c[0] for c in copies], device=self.k_pools[0].device)
        dst = torch.tensor([c[1] for c in copies], device=self.k_pools[0].device)
        for pool in self.k_pools + self.v_pools:
            pool[dst] = pool[src]

    def fork(self, n: int) -> None:
        """Parallel sampling: each row becomes n rows (itself, then n - 1 children) sharing its blocks."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rows, cached = [], []
        for s, c in zip(self.seqs, self.cached_tokens):
            rows.append(s)
            for _ in range(n - 1):
                child = Sequence(s.token_ids)
                self.block_manager.fork(s, child)
                self.live.append(child)
                rows.append(child)
            cached += [c] * n
        self.seqs, self.cached_tokens = rows, cached

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks (a second free raises: blocks are never released twice)."""
        self.block_manager.free(seq)
        if seq in self.live:
            self.live.remove(seq)

    def release(self) -> None:
        """Free the current rows; their full blocks stay findable by the prefix cache until reused."""
        for s in self.seqs:
            self.free(s)
        self.seqs, self.cached_tokens, self.length = [], [], 0

    def reset(self) -> None:
        for s in list(self.live):
            self.free(s)
        self.seqs, self.cached_tokens, self.length = [], [], 0

    # -- what the model calls ---------------------------------------------------------------------
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Write k, v [B, Hkv, S, D] for positions start..start+S; return what attention reads:
        contiguous keys/values 0..start+S, or ``PagedView``s for the Triton kernels."""
        if torch.is_tensor(start):
            raise NotImplementedError("the paged cache has no static-shape decode step")
        # the pools are [blocks, Hkv, block_size, D]: heads and dim in the places check_new_kv reads
        # (one head or a size-1 dim broadcast into every head of the pool without a word)
        check_new_kv(layer, self.k_pools, k, v, len(self.seqs))
        B, _, S, _ = k.shape
        if layer == 0 or self._meta is None:   # once per forward, shared by every layer
            self._meta = self._prepare(start, S, B, k.device)
        slots, rows, tables, lens = self._meta
        kt = k.transpose(1, 2).reshape(B * S, k.shape[1], k.shape[3])       # [B*S, Hkv, D], one row per token
        vt = v.transpose(1, 2).reshape(B * S, v.shape[1], v.shape[3])
        if rows is not None:                   # some tokens' KV already sits in shared cached blocks
            kt, vt = kt[rows], vt[rows]
        store_kv(kt, vt, self.k_pools[layer], self.v_pools[layer], slots)
        end = start + S
        if layer == len(self.k_pools) - 1:     # every layer's KV is in the pool: the new full blocks
            for s in self.seqs:                # may serve later prompts (prefix cache)
                self.block_manager.mark_computed(s, end)
        if self.attention == "kernel":
            return PagedView(self.k_pools[layer], tables, lens, end), PagedView(self.v_pools[layer], tables, lens, end)
        return gather_kv(self.k_pools[layer], tables, end), gather_kv(self.v_pools[layer], tables, end)

    def _prepare(self, start: int, S: int, B: int, device):
        """Slot mapping (and the rows to write) for positions start..start+S of every row, built on
        the host from the block tables, then moved to the device once."""
        if B != len(self.seqs):
            raise ValueError(f"a batch of {B} rows for a cache running {len(self.seqs)} sequences")
        for s in self.seqs:
            if len(s) != start + S:
                raise ValueError(f"sequence {s.seq_id} holds {len(s)} tokens but the forward writes "
                                 f"positions {start}..{start + S}: call add_prompts/append_tokens first")
        tables = torch.tensor([s.block_table for s in self.seqs], dtype=torch.int32)  # [B, blocks]
        pos = torch.arange(start, start + S)
        slots = tables[:, pos // self.block_size].long() * self.block_size + pos % self.block_size  # [B, S]
        fresh = (pos[None, :] >= torch.tensor(self.cached_tokens)[:, None]).reshape(-1)
        slots = slots.reshape(-1)
        rows = None
        if not bool(fresh.all()):
            rows, slots = fresh.nonzero()[:, 0].to(device), slots[fresh]
        lens = torch.full((B,), start + S, dtype=torch.int32)
        return slots.to(device), rows, tables.to(device), lens.to(device)

    # -- inspection --------------------------------------------------------------------------------
    def block_tables(self) -> list[list[int]]:
        return [list(s.block_table) for s in self.seqs]

    def ref_counts(self) -> dict[int, int]:
        """Reference count of every block in use."""
        return {b.block_id: b.ref_count for b in self.block_manager.blocks if b.ref_count > 0}

    def check(self) -> None:
        self.block_manager.check_invariants(self.live)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the pools (every block, used or not)."""
        return sum(t.numel() * t.element_size() for t in self.k_pools + self.v_pools)


def blocks_for_step(bm: BlockManager, seqs: list[Sequence]) -> int:
    """Free blocks one more token in every sequence needs: a new block where the token opens one,
    a copy where it writes into a block still shared (the last sharer writes in place)."""
    need, refs = 0, {}
    for s in seqs:
        if len(s) % bm.block_size == 0:                  # the last block is full: open a new one
            need += 1
            continue
        last = s.block_table[-1]
        r = refs.get(last, bm.blocks[last].ref_count)
        if r > 1:
            need += 1
            refs[last] = r - 1
    return need
