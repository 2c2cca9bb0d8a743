"""Sequence: one request's tokens and its block table, as the scheduler and block manager see it.

Plain Python. Besides its tokens a sequence carries what iteration-level scheduling needs: how many
of its tokens already have their keys and values in the pool (``num_computed_tokens``: a prefill
advances it by a chunk, a decode by one), how many have a slot in its blocks, and the timestamps
its latency metrics come from.
"""
from __future__ import annotations

import itertools
from enum import Enum, auto


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
        self.last_hash: int | None = None     # hash of the last full block (prefix-cache chain)
        self.status = SequenceStatus.WAITING
        # -- engine state -------------------------------------------------------------------------
        self.sampling_params = sampling_params
        self.request_id = request_id
        self.num_computed_tokens = 0          # tokens whose KV is in the pool
        self.num_slotted_tokens = 0           # tokens that have a slot in block_table
        self.num_cached_tokens = 0            # leading tokens found in the prefix cache (not written)
        self.num_preemptions = 0
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

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, len={len(self)}, blocks={self.block_table})"
