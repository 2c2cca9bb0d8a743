"""Async scheduling: the engine's next step is scheduled and launched before the host has read the
previous step's tokens (``EngineConfig(async_scheduling=True)``, a candidate, off by default; vLLM
has an option of that name).

In lockstep the GPU idles while the host reads a step's tokens, checks stops, schedules and launches
the next step: 4.4 ms of a 13 ms graphed decode step of a 7B model on the H100 (``engine.profile``,
2026-11-26). Instead, a step of greedy requests samples on the device and the host goes on at once:
it schedules the next step with a ``PENDING`` placeholder standing for each new token (lengths,
slots and blocks need no values), launches it with the placeholders taken from the device
(``ModelRunner.execute(feed=...)``), and only then reads the previous step's tokens and fills them
in. A sequence that turns out to have stopped was computed one token too far: that token is
dropped, and its blocks, freed at once, are reused only by work queued after it on the same stream.
One whose last token is certain (``max_tokens``, the context) sits the next step out. A block
completed by a placeholder is registered for prefix caching when its value arrives. A request that
ends while a token is on its way (``abort``, the pool error) keeps the tokens the host has read.
Sampled (non-greedy), n > 1 or min_tokens requests need their logits on the host: while any is in
the engine, steps run in lockstep.

``AsyncScheduling`` holds these steps for ``LLMEngine`` (its scheduler, block manager, runner and
step statistics); ``InFlight`` is a launched step whose tokens the host has not read.
"""
from __future__ import annotations

import time

import torch

from .outputs import RequestOutput
from .sequence import PENDING, Sequence


class InFlight:
    """A launched step whose sampled tokens are still on the device: its sampling sequences in row
    order, the tokens, their copy to the host (started at once) and its stats row."""

    __slots__ = ("seqs", "tokens", "host", "event", "stats")

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, stats: dict):
        self.seqs, self.tokens, self.stats = seqs, tokens, stats
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tokens, None

    def read(self) -> list[int]:
        """The tokens on the host: waits for this step only, not for any launched after it."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class AsyncScheduling:
    """The overlapped steps of ``LLMEngine``, on its state: the scheduler, block manager and runner,
    ``_inflight`` (the step not yet read), ``step_stats`` and ``overlapped_steps``; and its helpers
    shared with the lockstep step (``_schedule``, ``_computed``, ``_stop``, ``_stats_row``)."""

    def _can_overlap(self) -> bool:
        """Whether the next step may sample on the device and be read later: every request that
        could take part is greedy with n = 1 and no min_tokens (the others need their logits on
        the host: sampled, forked, or with tokens masked until min_tokens)."""
        return all(s.sampling_params.greedy and s.sampling_params.n == 1 and s.sampling_params.min_tokens == 0
                   for q in (self.scheduler.running, self.scheduler.waiting) for s in q)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Schedule and launch a step, then read and retire the previous one's tokens."""
        t0 = time.perf_counter()
        prev = self._inflight
        batch, touched = self._schedule(t0)
        new = None
        if batch.seqs:
            row_of = {id(s): r for r, s in enumerate(prev.seqs)} if prev is not None else {}
            rows = []
            for seq in batch.seqs:
                if seq.num_pending:       # its newest token is the one the previous step sampled
                    if id(seq) not in row_of or seq.num_pending != 1:
                        raise RuntimeError(f"sequence {seq.seq_id}: a pending token no launched step samples")
                    rows.append(row_of[id(seq)])
                else:
                    rows.append(-1)
            feed = (prev.tokens, rows) if any(r >= 0 for r in rows) else None
            self.overlapped_steps += prev is not None
            tokens = self.runner.execute(batch, feed=feed).argmax(-1)
            sampled = []
            for seq, n in zip(batch.seqs, batch.num_tokens):
                if self._computed(seq, n, t0):
                    seq.append_token(PENDING)
                    seq.num_pending += 1
                    seq.last_pending = (seq.num_completion_tokens >= seq.sampling_params.max_tokens
                                        or len(seq) >= self.max_model_len)
                    sampled.append(seq)
            new = InFlight(sampled, tokens, self._stats_row(batch, t0, None))
        if prev is not None:
            touched |= self._resolve(prev)
            if new is not None:           # rows tile the timeline: this one starts as that one ends
                new.stats["t_start"] = max(t0, prev.stats["t_end"])
        self._inflight = new
        if new is not None and not self.scheduler.has_unfinished():
            touched |= self._resolve(new)       # every row stopped in the step before: nothing to read
            self._inflight = None
        return self._step_outputs(touched)

    def _resolve(self, flight: InFlight) -> set[str]:
        """Read a launched step's tokens and put each in its sequence's place (a sequence finished
        meanwhile, by a stop or an abort, is skipped: its token was computed past its end). Returns
        the request ids touched."""
        toks = flight.read()
        now = time.perf_counter()
        flight.stats["t_end"] = now
        self.step_stats.append(flight.stats)
        touched = set()
        bs = self.block_manager.block_size
        for seq, tok in zip(flight.seqs, toks):
            if seq.is_finished:
                continue
            later, last = seq.num_pending - 1, seq.last_pending   # a step launched since holds one more
            if later:
                del seq.token_ids[-later:]
            if seq.token_ids[-1] != PENDING:
                raise RuntimeError(f"sequence {seq.seq_id}: no pending token where step's token goes")
            seq.token_ids[-1] = tok
            seq.num_pending, seq.last_pending = 0, False
            if len(seq) % bs == 0 and seq.block_table and seq.num_slotted_tokens >= len(seq):
                self.block_manager.seal_last_block(seq)        # the block it completed, now hashable
                self.block_manager.mark_computed(seq, seq.num_computed_tokens)
            if seq.first_token_time is None:
                seq.first_token_time = now
            touched.add(seq.request_id)
            reason, why = self._stop(seq, tok)
            if reason is not None:
                seq.stop_reason = why
                self.scheduler.finish(seq, reason)
                seq.finish_time = now
            elif later:
                seq.token_ids += [PENDING] * later
                seq.num_pending, seq.last_pending = later, last
        return touched
