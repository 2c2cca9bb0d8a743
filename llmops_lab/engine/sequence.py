"""Sequence: one request's tokens and its block table, as the scheduler and block manager see it."""
from __future__ import annotations

import itertools
from enum import Enum, auto


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = itertools.count()

    def __init__(self, token_ids: list[int], seq_id: int | None = None):
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        self.seq_id = next(Sequence._ids) if seq_id is None else seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.block_table: list[int] | None = []
        self.last_hash: int | None = None     # hash of the last full block (prefix-cache chain)
        self.status = SequenceStatus.WAITING

    def __len__(self) -> int:
        return len(self.token_ids)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, len={len(self)}, blocks={self.block_table})"
