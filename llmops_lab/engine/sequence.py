"""Sequence: one request's tokens and its block table, as the scheduler and block manager see it.

Plain Python. Besides its tokens a sequence carries what iteration-level scheduling needs: how many
of its tokens already have their keys and values in the pool (``num_computed_tokens``: a prefill
advances it by a chunk, a decode by one), how many have a slot in its blocks, and the timestamps
its latency metrics come from.
"""
from __future__ import annotations

import itertools
from enum import Enum, auto

# A token sampled on the device that the host has not read yet (``EngineConfig(async_scheduling=True)``):
# it stands in the token list, so lengths, slots and blocks are right, until the engine fills it in.
PENDING = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], seq_id: int | None = None, sampling_params=None,
                 request_id: str | None = None, arrival_time: float = 0.0):
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        self.seq_id = next(Sequence._ids) if seq_id is None else seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.block_table: list[int] | None = []
        self.last_hash: bytes | None = None   # hash of the last full block (prefix-cache chain)
        self.status = SequenceStatus.WAITING
        # -- engine state -------------------------------------------------------------------------
        self.sampling_params = sampling_params
        self.request_id = request_id
        self.num_computed_tokens = 0          # tokens whose KV is in the pool
        self.num_slotted_tokens = 0           # tokens that have a slot in block_table
        self.num_cached_tokens = 0            # leading tokens found in the prefix cache (not written)
        self.num_preemptions = 0
        self.num_pending = 0                  # trailing PENDING tokens (async scheduling: 0, 1 or 2)
        self.last_pending = False             # its newest PENDING token is certainly its last (length)
        self.finish_reason: str | None = None  # "stop", "length", "abort" or "error"
        self.error: str | None = None
        self.stop_reason = None               # the stop token id or string that ended it
        # -- metrics (seconds, time.perf_counter) --------------------------------------------------
        self.arrival_time = arrival_time
        self.scheduled_time: float | None = None   # first admitted to the running batch
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_pending(self) -> int:
        """Remove the trailing PENDING tokens (a finished sequence's, computed past its end); returns
        how many there were."""
        n = self.num_pending
        if n:
            del self.token_ids[-n:]
        self.num_pending, self.last_pending = 0, False
        return n

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The completion's tokens the host knows (not the PENDING ones still on the device)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, len={len(self)}, blocks={self.block_table})"
