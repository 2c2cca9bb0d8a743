"""BlockManager: the KV cache as fixed-size blocks, as in PagedAttention (Kwon et al. 2023, vLLM).

A sequence's KV cache is a list of block ids (its block table), like a process's page table: a
sequence of n tokens holds ceil(n / block_size) blocks, wherever they are in the pool, so at most
block_size - 1 slots per sequence are wasted. Blocks are reference-counted: forked sequences
(parallel sampling) share their prompt's blocks, and a shared block is copied only when one of
them writes into it (copy-on-write). Full blocks are registered under a hash of their tokens and
of everything before them (prefix caching): a later sequence with the same prefix reuses them.

With ``track_computed`` (the continuous-batching engine, whose prefills run in chunks over several
steps, and ``PagedKVCache``, whose forward may fail) a newly filled block is a prefix-cache hit only
once ``mark_computed`` says its keys and values are in the pool; without it a block counts as soon
as it is allocated, which is right only if the forward that follows is sure to compute it.

Plain Python bookkeeping, no tensors: the model runner performs the copies this class asks for.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, deque

from ..checks import is_int
from .sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """The pool is exhausted: the scheduler should preempt or wait, nothing was changed."""


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None        # set once the block is full (prefix caching)
        self.token_ids: tuple[int, ...] = ()


def block_hash(token_ids, prefix_hash: bytes | None) -> bytes:
    """Identity of a full block: its tokens and, through prefix_hash, every token before it.

    SHA-256 of the previous block's digest and this block's token ids. A hit also compares the
    block's own tokens, but the blocks before it are vouched for by the chain alone, so two prefixes
    with one hash would share keys and values without a word. Python's ``hash`` of a tuple of ints
    is 64 bits and the same in every process, so such prompts can be made on purpose; vLLM added
    SHA-256 for that reason (v0.8.3) and made it its default (v0.10.2). A first block (no prefix)
    hashes 8 bytes a token, a later one 32 more, so the two can never be read alike.
    """
    h = hashlib.sha256(prefix_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 track_computed: bool = False):
        # an integer first: 4.0 fails the bit test with a raw TypeError, True would pass as 1
        if not is_int(block_size) or block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {block_size!r}")
        if not is_int(num_blocks) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.cached: dict[bytes, int] = {}    # hash -> block id, for full blocks
        self.prefix_caching = enable_prefix_caching
        self.prefix_hits = 0                  # blocks reused from the cache, for the notebooks
        self.track_computed = track_computed
        self.pending: set[int] = set()        # full blocks whose KV is not written yet (track_computed)

    # -- pool ------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def _take(self, block_id: int | None = None) -> Block:
        if block_id is None:
            if not self.free_ids:
                raise NoFreeBlocksError("no free KV blocks left")
            block_id = self.free_ids.popleft()
        else:
            self.free_ids.remove(block_id)
        b = self.blocks[block_id]
        if b.hash is not None:                # evict: its old content is about to be overwritten
            if self.cached.get(b.hash) == block_id:
                del self.cached[b.hash]
            self.pending.discard(block_id)
            b.hash, b.token_ids = None, ()
        b.ref_count = 1
        return b

    def _release(self, block_id: int) -> None:
        b = self.blocks[block_id]
        if b.ref_count <= 0:
            raise RuntimeError(f"block {block_id} freed twice")
        b.ref_count -= 1
        if b.ref_count == 0:
            self.free_ids.append(block_id)    # content stays cached until the block is reused

    # -- sequences -------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence) -> int:
        return -(-len(seq) // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) - self._shared_hits(seq) <= self.num_free_blocks

    def _shared_hits(self, seq: Sequence) -> int:
        """How many of seq's leading full blocks are cached in blocks other sequences hold (those
        cost no free block; a cached block sitting on the free list still takes one)."""
        if not self.prefix_caching:
            return 0
        h, hits = None, 0
        for i in range(len(seq) // self.block_size):
            toks = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(toks, h)
            bid = self.cached.get(h)
            if bid is None or bid in self.pending or self.blocks[bid].token_ids != tuple(toks):
                break
            hits += self.blocks[bid].ref_count > 0
        return hits

    def allocate(self, seq: Sequence, computing=frozenset()) -> int:
        """Give seq (no blocks yet) blocks for all its tokens; returns how many tokens were found in
        the prefix cache (their KV need not be computed). Blocks in ``computing`` are hits even while
        pending: the same forward as seq's computes their KV (identical prompts in one batch)."""
        self._check_not_freed(seq)
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already has blocks")
        if not self.can_allocate(seq):
            raise NoFreeBlocksError(f"sequence {seq.seq_id} needs {self.blocks_needed(seq)} blocks, "
                                    f"{self.num_free_blocks} free")
        h, cached_tokens, hit_run = None, 0, True
        for i in range(self.blocks_needed(seq)):
            toks = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            full = len(toks) == self.block_size
            h = block_hash(toks, h) if full else None
            bid = self.cached.get(h) if (full and self.prefix_caching and hit_run) else None
            if (bid is not None and (bid not in self.pending or bid in computing)
                    and self.blocks[bid].token_ids == toks):
                b = self.blocks[bid]
                if b.ref_count == 0:
                    self.free_ids.remove(bid)
                b.ref_count += 1
                cached_tokens += self.block_size
                self.prefix_hits += 1
            else:
                hit_run = False
                b = self._take()
                if full:
                    self._register(b, h, toks)
            seq.block_table.append(b.block_id)
            if full:                  # the chain continues from the last *full* block only
                seq.last_hash = h
        return cached_tokens

    def _register(self, b: Block, h: bytes, toks: tuple) -> None:
        b.hash, b.token_ids = h, toks
        if self.prefix_caching:
            self.cached[h] = b.block_id
            if self.track_computed:
                self.pending.add(b.block_id)

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """The KV of seq's first num_tokens tokens is in the pool: its full blocks among them become
        prefix-cache hits for later sequences (with ``track_computed``)."""
        if self.pending:
            for bid in seq.block_table[:num_tokens // self.block_size]:
                self.pending.discard(bid)

    def can_append(self, seq: Sequence) -> bool:
        """Whether seq's newest token (appended to seq.token_ids, not yet given a slot) can get
        one: a new block when it opens one, a copy when it writes into a shared block."""
        needs_new = self.blocks_needed(seq) > len(seq.block_table)
        shared_last = not needs_new and self.blocks[seq.block_table[-1]].ref_count > 1
        return self.num_free_blocks >= (1 if needs_new or shared_last else 0)

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for seq's newest token (already appended to seq.token_ids).

        Returns (src, dst) when the last block was shared and had to be copied (copy-on-write):
        the model runner copies the KV of block src into block dst before writing.
        """
        self._check_not_freed(seq)
        n = len(seq)
        copy = None
        if len(seq.block_table) < self.blocks_needed(seq):       # token opens a new block
            seq.block_table.append(self._take().block_id)
        else:
            last = self.blocks[seq.block_table[-1]]
            if last.ref_count > 1:                                # shared: copy before writing
                new = self._take()
                last.ref_count -= 1
                seq.block_table[-1] = new.block_id
                copy = (last.block_id, new.block_id)
        # the block just became full; a newest token still on the device (PENDING, async
        # scheduling) has no value to hash yet: the engine seals the block when it arrives
        if n % self.block_size == 0 and seq.token_ids[n - 1] >= 0:
            self.seal_last_block(seq)
        return copy

    def seal_last_block(self, seq: Sequence) -> None:
        """seq's newest token filled its last block: register the block under the hash of its tokens
        and of everything before them (prefix caching), and continue seq's hash chain from it."""
        n, bs = len(seq), self.block_size
        if n % bs or len(seq.block_table) != n // bs:
            raise RuntimeError(f"sequence {seq.seq_id}: {n} tokens do not end its last block")
        b = self.blocks[seq.block_table[-1]]
        toks = tuple(seq.token_ids[n - bs:n])
        h = block_hash(toks, seq.last_hash if n > bs else None)
        if b.hash is None:
            self._register(b, h, toks)
        seq.last_hash = h

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (parallel sampling); writes will copy-on-write."""
        self._check_not_freed(parent)
        self._check_not_freed(child)
        if child.block_table:
            raise RuntimeError(f"sequence {child.seq_id} already has blocks")
        for bid in parent.block_table:
            self.blocks[bid].ref_count += 1
        child.block_table = list(parent.block_table)
        child.last_hash = parent.last_hash

    @staticmethod
    def _check_not_freed(seq: Sequence) -> None:
        """A freed sequence's table is None until its owner gives it a fresh one (the scheduler sets
        [] when it preempts): using it before then failed as a bare TypeError or AttributeError."""
        if seq.block_table is None:
            raise RuntimeError(f"sequence {seq.seq_id} was freed; give it a new block table "
                               f"(seq.block_table = []) before allocating again")

    def free(self, seq: Sequence) -> None:
        if seq.block_table is None:
            raise RuntimeError(f"sequence {seq.seq_id} freed twice")
        # every block checked before any is released: a table holding a block already freed used
        # to hand back the blocks before it first, another sequence's among them, then raise
        uses = Counter(seq.block_table)
        over = next((bid for bid, n in uses.items() if self.blocks[bid].ref_count < n), None)
        if over is not None:
            raise RuntimeError(f"block {over} freed twice (sequence {seq.seq_id} holds it {uses[over]} "
                               f"time(s), its ref count is {self.blocks[over].ref_count}); nothing was freed")
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = None   # a second free is an error, not a silent double release

    # -- checks ----------------------------------------------------------------------------------
    def check_invariants(self, live: list[Sequence]) -> None:
        """No block both free and used; ref counts equal table references; nothing leaked."""
        refs = [0] * len(self.blocks)
        for s in live:
            for bid in s.block_table or ():
                refs[bid] += 1
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is on the free list twice"
        for b in self.blocks:
            assert b.ref_count == refs[b.block_id], f"block {b.block_id}: ref {b.ref_count} != {refs[b.block_id]} uses"
            assert (b.ref_count == 0) == (b.block_id in free), f"block {b.block_id} free and used (or neither)"
