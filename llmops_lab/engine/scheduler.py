"""Scheduler: iteration-level scheduling (Yu et al. 2022, Orca; Kwon et al. 2023, vLLM).

Every step the scheduler decides afresh which sequences run and how many tokens each computes:

1. Running sequences first, in arrival order: a decoding one computes its newest token (one), one
   whose prompt is only partly computed takes the next chunk (chunked prefill), so a long prompt
   never holds up the decodes. A token that needs a new block (or a copy of a shared one) gets it
   here; when the pool is dry the most recently admitted sequence is preempted: its blocks are
   freed and it goes back to the front of the queue, to be recomputed from its tokens later
   (preemption by recompute: it then produces exactly the tokens it would have).
2. Then waiting sequences are admitted while ``max_num_seqs``, the token budget
   (``max_num_batched_tokens``) and the free blocks allow; the prefix cache may already hold
   the KV of their leading blocks.

Plain Python, no tensors: the model runner gets a ``ScheduledBatch`` and the block copies to make.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)          # tokens each sequence computes now
    copies: list[tuple[int, int]] = field(default_factory=list)   # (src, dst) block copies, first
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)          # can never fit: finished with error

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        total = len(block_manager.blocks)
        self.watermark = max(1, total // 100)     # free blocks kept back at admission, against thrashing

    # -- queue -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Retire seq at once: out of the batch, its blocks back in the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free(seq)
            seq.block_table = []
        seq.drop_pending()                   # tokens sampled past its end are never read
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.error = reason, error

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.block_table, seq.last_hash = [], None
        seq.num_computed_tokens = seq.num_slotted_tokens = seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    @staticmethod
    def _seats(seq: Sequence) -> int:
        """Running slots seq will take: a parallel-sampling request (n > 1) forks into n sequences
        after its prefill, so it is admitted only when n seats are free."""
        p = seq.sampling_params
        return p.n if p is not None and p.n > 1 and seq.num_completion_tokens == 0 else 1

    def _pool_error(self, seq: Sequence) -> str:
        return (f"the KV pool is too small for this request: {len(seq)} tokens need "
                f"{self.bm.blocks_needed(seq)} blocks of {self.bm.block_size}, the pool has "
                f"{len(self.bm.blocks)} (raise num_kv_blocks / gpu_memory_utilization or lower max_tokens)")

    # -- one step --------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.last_pending:                # async scheduling: its last token is on its way
                i += 1
                continue
            if seq.num_slotted_tokens < len(seq):               # its newest token needs a slot
                while not self.bm.can_append(seq):
                    if len(self.running) == 1:                  # alone and still no room: never fits
                        self.finish(seq, "error", self._pool_error(seq))
                        batch.failed.append(seq)
                        break
                    victim = self.running[-1]
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    break                                       # seq was the last one: nothing follows
                copy = self.bm.append_slot(seq)
                seq.num_slotted_tokens = len(seq)
                if copy is not None:
                    batch.copies.append(copy)
            n = len(seq) - seq.num_computed_tokens
            if n > budget and not chunked:
                break
            n = min(n, budget)
            batch.add(seq, n)
            budget -= n
            i += 1
        if batch.preempted:
            return batch                                        # no admissions in a step that preempted
        # a request with n > 1 will fork; one whose last token is on its way leaves when it arrives
        seats = sum(self._seats(s) for s in self.running if not s.last_pending)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seats + self._seats(seq) > self.config.max_num_seqs:
                break
            if self.bm.blocks_needed(seq) > len(self.bm.blocks):
                self.waiting.popleft()
                self.finish(seq, "error", self._pool_error(seq))
                batch.failed.append(seq)
                continue
            if not chunked and len(seq) > budget:
                break
            if not self.bm.can_allocate(seq):
                break
            if self.running and self.bm.num_free_blocks - self.bm.blocks_needed(seq) < self.watermark:
                break
            cached = self.bm.allocate(seq)
            self.waiting.popleft()
            seq.num_cached_tokens = cached
            seq.num_computed_tokens = min(cached, len(seq) - 1)   # the last token always runs (logits)
            seq.num_slotted_tokens = len(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats += self._seats(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        return batch
