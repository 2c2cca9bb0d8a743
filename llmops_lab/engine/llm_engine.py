"""LLMEngine: continuous batching (iteration-level scheduling) on the paged KV cache.

``add_request`` queues a prompt, ``step`` runs one iteration (the scheduler picks prefill chunks
and decodes, the model runner computes them in one packed forward pass, new tokens are sampled,
finished sequences are retired and their blocks freed at once), ``abort`` cancels a request at any
point (``abort_request``, vLLM's name, takes several ids and ignores unknown ones). Bad input is
refused at ``add_request`` with a clear error and leaves the engine untouched; a request that can
never fit in the pool is finished with an error while the others go on.

``step`` returns, as vLLM's does, an output for every request that finished in it and for every
running one it gave a token (its completion so far, or only what is new, as its
``SamplingParams.output_kind`` asks; ``FINAL_ONLY``: finished ones only). One difference from
vLLM's engine: a finished request is kept, with its metrics, until ``release(request_id)`` forgets
it (``LLM.generate`` releases its own); a long-running loop over ``step`` should release what it
has collected. ``get_output(request_id)`` reads any request's output at any time.

With ``EngineConfig(async_scheduling=True)`` steps of greedy requests overlap the host's work with
the GPU's (``async_scheduling``, a candidate).
"""
from __future__ import annotations

import itertools
import math
import time
import warnings

import torch

from ..checks import integer_ids, is_int, is_real
from ..generation import logits_to_probs
from ..measure import synchronize
from .async_scheduling import AsyncScheduling, InFlight
from .block_manager import BlockManager
from .config import EngineConfig
from .model_runner import ModelRunner, decode_graphs_possible, num_kv_blocks
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams, completion_text, decode_completion, stop_reason, streamed_text
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus


# the largest packed prompt total ``EngineConfig(prefill_graphs=True)`` captures: past a few hundred
# tokens a step is compute-bound and its eager launches no longer cost more than the GPU's work
PREFILL_GRAPH_TOKENS = 512


@torch.inference_mode()
def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> None:
    """Row i of logits may not produce the ids banned[i] (``SamplingParams.banned_tokens``): -inf."""
    rows = [(i, t) for i, ids in enumerate(banned) for t in ids]
    if rows:
        r, t = torch.tensor(rows, device=logits.device).unbind(1)
        logits[r, t] = float("-inf")


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of logits [V] under params (argmax when greedy)."""
    if params.greedy:
        return int(logits.argmax())
    probs = logits_to_probs(logits[None], params.temperature, params.top_k_or_none, params.top_p_or_none)
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)           # the per-request generators live on the CPU
    return int(torch.multinomial(probs, 1, generator=generator))


class _Request:
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "seqs", "metrics", "forked",
                 "generators", "sent")

    def __init__(self, request_id, prompt, ids, params, arrival):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, ids, params
        self.seqs: list[Sequence] = []
        self.metrics = RequestMetrics(arrival)
        self.forked = params.n == 1
        self.generators: list[torch.Generator | None] = []
        self.sent: dict[int, tuple[int, int]] = {}   # RequestOutputKind.DELTA: sample i's tokens and characters sent


class LLMEngine(AsyncScheduling):
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        ctx = model.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > ctx:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {ctx}")
        self.max_model_len = config.max_model_len or ctx
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            # a sequence preempted late must be recomputed in one step, prompt and output together
            raise ValueError(f"without chunked prefill, max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must hold a whole sequence of max_model_len ({self.max_model_len}): raise it, "
                             f"lower max_model_len, or enable chunked prefill")
        blocks = num_kv_blocks(model, config, self.max_model_len)
        if blocks * config.block_size < self.max_model_len:
            # vLLM refuses to start here; a pool too small for some requests is allowed (each such
            # request ends on its own with finish_reason "error", the others finish), but said at once
            warnings.warn(f"the KV pool holds {blocks * config.block_size} tokens ({blocks} blocks of "
                          f"{config.block_size}), fewer than max_model_len ({self.max_model_len}): a request "
                          f"that outgrows it ends with finish_reason 'error'; give the cache more memory or "
                          f"lower max_model_len", stacklevel=2)
        self.block_manager = BlockManager(blocks, config.block_size, config.enable_prefix_caching,
                                          track_computed=True)
        self.scheduler = Scheduler(config, self.block_manager)
        graphs = "capture" if not config.enforce_eager and decode_graphs_possible(model) else None
        prefill = min(PREFILL_GRAPH_TOKENS, config.max_num_batched_tokens) if graphs and config.prefill_graphs else None
        self.runner = ModelRunner(model, blocks, config.block_size, decode_graphs=graphs,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  cpu_kernel=config.cpu_paged_kernel, prefill_graphs=prefill,
                                  fused_ops=config.fused_ops and graphs is not None)
        if self.runner.use_kernels:           # compile the Triton kernels now, not in a served step
            self.runner.warm_up()
        self.requests: dict[str, _Request] = {}
        self.eos_ids = set(model.config.eos_token_ids)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.step_stats: list[dict] = []      # one row per step: time, batch, tokens, blocks in use
        self._inflight: InFlight | None = None  # async scheduling: the step whose tokens are unread
        self.overlapped_steps = 0             # steps launched before the previous step's tokens were read
        self._ids = itertools.count()

    @property
    def num_kv_blocks(self) -> int:
        return len(self.block_manager.blocks)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a prompt (text, or a list of token ids). ``arrival_time``: when it arrived, a
        ``time.perf_counter()`` reading no later than now (default: now). Raises ValueError for bad
        input; the engine is left as it was."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        now = time.perf_counter()
        if arrival_time is not None and (not is_real(arrival_time) or not -math.inf < arrival_time <= now):
            # NaN or a future time would make every latency of the request NaN or negative
            raise ValueError(f"arrival_time must be a time.perf_counter() reading no later than now "
                             f"({now:.3f}), got {arrival_time!r}")
        if request_id is None:               # the next number no request of the caller's holds
            request_id = next(i for i in map(str, self._ids) if i not in self.requests)
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = self._encode(prompt)
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"request {request_id}: empty prompt")
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"request {request_id}: token ids must lie in [0, {V})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {request_id}: prompt of {len(ids)} tokens leaves no room in "
                             f"max_model_len {self.max_model_len}")
        need = math.ceil(len(ids) / self.config.block_size)
        if need > self.num_kv_blocks:
            raise ValueError(f"request {request_id}: the prompt alone needs {need} KV blocks, the whole "
                             f"pool has {self.num_kv_blocks}")
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(f"request {request_id}: a prompt of {len(ids)} tokens exceeds "
                             f"max_num_batched_tokens {self.config.max_num_batched_tokens} without chunked prefill")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"request {request_id}: n={params.n} samples exceed max_num_seqs "
                             f"{self.config.max_num_seqs}")
        if params.stop_token_ids and max(params.stop_token_ids) >= V:
            # banning it under min_tokens would index past the logits in every later step
            raise ValueError(f"request {request_id}: stop_token_ids must lie in [0, {V}), "
                             f"got {max(params.stop_token_ids)}")
        if params.stop:
            self._check_stop_strings(params.stop)
        arrival = now if arrival_time is None else float(arrival_time)
        req = _Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, arrival)
        seq = Sequence(ids, sampling_params=params, request_id=request_id, arrival_time=arrival)
        req.seqs.append(seq)
        req.generators.append(self._generator(params, 0))
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def _encode(self, prompt) -> list[int]:
        """Token ids of a prompt: text, a sequence of integer ids, or a 1-D integer tensor. Anything
        else (None, floats, a 2-D tensor) is a ValueError, not a guess: int(5.7) would be a
        silently different prompt."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            return list(self.tokenizer(prompt).input_ids) if prompt else []
        if torch.is_tensor(prompt):
            if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
                raise ValueError(f"a tensor prompt must be 1-D integer token ids, got {prompt.dim()}-D {prompt.dtype}")
            return prompt.tolist()
        if not isinstance(prompt, (list, tuple, range)):
            raise ValueError(f"a prompt must be a string, a list of token ids or a 1-D tensor, got "
                             f"{type(prompt).__name__}")
        return integer_ids(prompt)

    def _check_stop_strings(self, stops) -> None:
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        for s in stops:
            ids = self.tokenizer(s, add_special_tokens=False).input_ids
            back = self.tokenizer.decode(ids, skip_special_tokens=True)   # as the output text is decoded
            # and after other text (itself), as a completion is: SentencePiece-style tokenizers drop
            # the space of a string's first token, so " sir" comes back "sir" alone, " sir" after text
            if s not in (back, decode_completion(self.tokenizer, ids, ids)):
                raise ValueError(f"stop string {s!r} cannot appear in this tokenizer's output text "
                                 f"(it decodes back as {back!r}; a special token is left out of the text: "
                                 f"give its id in stop_token_ids)")

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        # any integer seed (vLLM takes any), folded into the generator's 64-bit range
        return torch.Generator(device="cpu").manual_seed((params.seed * 1_000_003 + index) % 2**63)

    def abort(self, request_id: str) -> None:
        """Cancel a request wherever it is (queued, prefilling, decoding); its blocks are freed."""
        req = self._request(request_id)
        now = time.perf_counter()
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                seq.finish_time = now

    def abort_request(self, request_id) -> None:
        """vLLM's name: cancel one request id or several; ids not (or no longer) here are ignored,
        as vLLM ignores them (``abort`` refuses an unknown id)."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            if rid in self.requests:
                self.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one packed forward, sample, retire. Returns an output for every request
        that finished in this step, and for every running one that gained tokens unless its
        ``SamplingParams.output_kind`` is ``FINAL_ONLY`` (``_step_outputs``)."""
        if self.config.async_scheduling and self._can_overlap():
            return self._step_overlapped()
        touched = self._resolve(self._inflight) if self._inflight is not None else set()
        self._inflight = None
        t0 = time.perf_counter()
        batch, failed = self._schedule(t0)
        touched |= failed
        if batch.seqs:
            logits = self.runner.execute(batch)
            sampling = [seq for seq, n in zip(batch.seqs, batch.num_tokens) if self._computed(seq, n, t0)]
            ban_tokens(logits, [s.sampling_params.banned_tokens(self.eos_ids, s.num_completion_tokens)
                                for s in sampling])
            # every greedy row's token in one reduction and one device-to-host copy, not one each
            argmax = logits.argmax(-1).tolist() if any(getattr(s.sampling_params, "greedy", False) for s in batch.seqs) else None
            if argmax is None:
                synchronize(logits.device)   # a GPU runs the step asynchronously: stop the clock when it is done
            now = time.perf_counter()
            for row, seq in enumerate(sampling):      # logits hold one row per sampling sequence
                try:
                    self._sample(seq, logits[row], now, None if argmax is None else argmax[row])
                except Exception as e:  # noqa: BLE001 - the request fails, the engine and the others go on
                    self._fail(seq, f"sampling failed: {type(e).__name__}: {e}", now)
                touched.add(seq.request_id)
            self.step_stats.append(self._stats_row(batch, t0, now))
        return self._step_outputs(touched)

    def _schedule(self, t0: float):
        """The scheduler's batch for a step starting at t0, and the requests it failed (finished
        with an error: the pool cannot hold them)."""
        batch = self.scheduler.schedule()
        for s in batch.failed:
            s.finish_time = t0
        return batch, {s.request_id for s in batch.failed}

    def _computed(self, seq: Sequence, n: int, t0: float) -> bool:
        """seq's next n tokens were computed by a step started at t0; whether it samples now (every
        token it has is computed)."""
        if seq.scheduled_time is None:
            seq.scheduled_time = t0
        seq.num_computed_tokens += n
        self.block_manager.mark_computed(seq, seq.num_computed_tokens)
        return seq.num_computed_tokens == len(seq)

    def _stats_row(self, batch, t0: float, t_end: float | None) -> dict:
        return {"t_start": t0, "t_end": t_end, "num_seqs": len(batch), "num_tokens": batch.total_tokens,
                "num_decode": sum(1 for n in batch.num_tokens if n == 1),
                "blocks_in_use": self.num_kv_blocks - self.block_manager.num_free_blocks,
                "num_waiting": len(self.scheduler.waiting), "num_preempted": len(batch.preempted)}

    def _sample(self, seq: Sequence, logits: torch.Tensor, now: float, argmax: int | None = None) -> None:
        req = self.requests[seq.request_id]
        p = req.params
        if not req.forked:                    # n > 1: the prompt's blocks are shared, copy-on-write
            req.forked = True
            for i in range(1, p.n):
                child = Sequence(seq.token_ids, sampling_params=p, request_id=req.request_id,
                                 arrival_time=seq.arrival_time)
                self.block_manager.fork(seq, child)
                for a in ("num_computed_tokens", "num_slotted_tokens", "num_cached_tokens", "scheduled_time"):
                    setattr(child, a, getattr(seq, a))
                child.status = SequenceStatus.RUNNING
                self.scheduler.running.append(child)
                req.seqs.append(child)
                req.generators.append(self._generator(p, i))
                self._sample_one(req, child, logits, now, argmax)
        self._sample_one(req, seq, logits, now, argmax)

    def _sample_one(self, req: _Request, seq: Sequence, logits: torch.Tensor, now: float,
                    argmax: int | None = None) -> None:
        if req.params.greedy and argmax is not None:
            tok = argmax
        else:
            tok = sample_token(logits, req.params, req.generators[req.seqs.index(seq)] or self.generator)
        seq.append_token(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason, why = self._stop(seq, tok)
        if reason is not None:
            seq.stop_reason = why
            self.scheduler.finish(seq, reason)
            seq.finish_time = now

    def _fail(self, seq: Sequence, message: str, now: float) -> None:
        """End seq's request with an error (every sequence of it), its blocks freed."""
        for s in self.requests[seq.request_id].seqs:
            if not s.is_finished:
                self.scheduler.finish(s, "error", message)
                s.finish_time = now

    def _stop(self, seq: Sequence, tok: int):
        return stop_reason(seq, tok, self.eos_ids, self.max_model_len, self.tokenizer)

    # -- outputs ----------------------------------------------------------------------------------
    @staticmethod
    def _finished(req: _Request) -> bool:
        """All its sequences are done (a request that failed before forking has just the one)."""
        return all(s.is_finished for s in req.seqs) and (
            req.forked or req.seqs[0].finish_reason in ("error", "abort"))

    def _text(self, seq: Sequence) -> str:
        text = completion_text(self.tokenizer, seq.output_token_ids, seq.stop_reason, seq.finish_reason,
                               seq.sampling_params.include_stop_str_in_output, seq.prompt_token_ids)
        return text if seq.is_finished else streamed_text(text, seq.sampling_params)

    def _step_outputs(self, touched: set[str]) -> list[RequestOutput]:
        """What a step returns for the requests it touched (in the order they were added): each
        finished one, and each running one unless it asked for ``FINAL_ONLY``; a ``DELTA`` request's
        output holds only what is new since its last."""
        outs = []
        for rid in (r for r in self.requests if r in touched) if touched else ():
            req = self.requests[rid]
            kind = req.params.output_kind
            if self._finished(req) or kind is not RequestOutputKind.FINAL_ONLY:
                outs.append(self._output(req, delta=kind is RequestOutputKind.DELTA))
        return outs

    def _output(self, req: _Request, delta: bool = False) -> RequestOutput:
        """req's output: every sample's completion so far (``delta``: only the tokens and text
        since the last delta output, which this one moves on).

        The metrics are the request's, as vLLM's are, whatever its n: the first token is its
        samples' first (they are forked from one prompt and get it in the same step), the finish is
        its last sample's, and ``num_output_tokens`` is its longest sample's length (every running
        sample gains one token a step: the length of the request's decode). So TPOT = (e2e - TTFT) / (longest - 1) is the time per token of the
        request's decode; sample 0's length with the last sample's finish was neither (TPOT twice
        too high, or None beside a sample of 20 tokens). Throughput counts every sample's tokens:
        the workload rows sum them (``workload._row``)."""
        m = req.metrics
        seqs = req.seqs
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        scheduled = [s.scheduled_time for s in seqs if s.scheduled_time is not None]
        m.first_scheduled_time = min(scheduled) if scheduled else None
        m.first_token_time = min(firsts) if firsts else None
        done = all(s.is_finished for s in seqs)
        m.finish_time = max(s.finish_time for s in seqs) if done else None
        m.num_output_tokens = max(len(s.output_token_ids) for s in seqs)
        errors = [s.error for s in seqs if s.error]
        outs = []
        for i, s in enumerate(seqs):
            ids, text = s.output_token_ids, self._text(s)
            if delta:
                n_ids, n_chars = req.sent.get(i, (0, 0))
                req.sent[i] = (len(ids), max(n_chars, len(text)))
                ids, text = ids[n_ids:], text[n_chars:]
            outs.append(CompletionOutput(i, text, ids, s.finish_reason, s.stop_reason, s.num_preemptions))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, done, m,
                             errors[0] if errors else None)

    def _request(self, request_id) -> _Request:
        req = self.requests.get(str(request_id))
        if req is None:
            raise KeyError(f"no request {request_id!r} (never added, or already released)")
        return req

    def get_output(self, request_id: str) -> RequestOutput:
        """The request's output so far, whatever its ``output_kind``: every token, and the text
        without what may still change while it runs (``streamed_text``)."""
        return self._output(self._request(request_id))

    def release(self, request_id: str) -> None:
        """Forget a finished request (its output was collected)."""
        req = self._request(request_id)
        if not all(s.is_finished for s in req.seqs):
            raise RuntimeError(f"request {request_id} is still running: abort it first")
        del self.requests[str(request_id)]

    def check(self) -> None:
        """Block-manager invariants over every sequence holding blocks."""
        live = [s for s in self.scheduler.running]
        self.block_manager.check_invariants(live)
