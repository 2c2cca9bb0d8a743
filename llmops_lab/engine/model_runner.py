"""ModelRunner: the one part of the engine that touches tensors.

It owns the KV pools (one K and one V pool per layer, token-major [num_blocks, block_size, Hkv, D]:
see ``paged.varlen``), turns a
``ScheduledBatch`` into one packed forward pass (token ids, RoPE positions, slot mapping, block
tables, context lengths: built on the host in plain Python, moved to the device once), performs the
copy-on-write block copies the block manager asked for, and returns the logits of the sequences
that sample this step (those whose every known token is now computed). A step of decodes alone
replays a captured CUDA graph when the runner has them (``cuda_graph.DecodeGraphs``); with
``prefill_graphs``, a step whose prompts are all whole and new replays ``cuda_graph.PrefillGraphs``
for them beside the decode graph for the rest (a candidate, off by default); with ``fused_ops`` the
graphed steps run each layer's elementwise ops as one kernel each (``fused_ops``, a candidate).
"""
from __future__ import annotations

import math

import torch

from ..measure import synchronize
from ..paged.varlen import PackedBatch, packed_paged_attention
from .config import EngineConfig
from .cuda_graph import DecodeGraphs, PrefillGraphs, staged
from .scheduler import ScheduledBatch
from .sequence import Sequence


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype | None = None) -> int:
    c = model.config
    itemsize = torch.empty((), dtype=dtype or model.dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * block_size * c.head_dim * itemsize


def decode_graphs_possible(model) -> bool:
    """Whether decode steps of ``model`` can be captured: CUDA, Triton, and no sliding window (the
    paged decode kernel has none)."""
    from ..paged import triton_paged
    return (model.device.type == "cuda" and model.config.sliding_window is None
            and triton_paged.available(model.device))


class ModelRunner:
    """``decode_graphs``: "capture" (CUDA graphs of decode steps up to ``max_num_seqs`` sequences),
    "static" (the same static buffers, run eagerly: the tests' check of that path), or None.
    ``prefill_graphs``: the largest packed total of new whole prompts computed by prefill graphs
    (captured or static like the decode graphs, which they need), or None."""

    def __init__(self, model, num_blocks: int, block_size: int, decode_graphs: str | None = None,
                 max_num_seqs: int = 1, max_model_len: int | None = None, cpu_kernel: bool = True,
                 prefill_graphs: int | None = None, fused_ops: bool = False):
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks          # those the block manager hands out (no scratch block)
        c, dev, dt = model.config, model.device, model.dtype
        self.use_kernels = dev.type == "cuda"
        # CPU decode attention: the C kernel, built now (about a second, once per machine) rather
        # than inside the first step; where it cannot be built, the gather+SDPA reference runs
        self.cpu_kernel = cpu_kernel and dev.type == "cpu"
        if self.cpu_kernel:
            from ..paged import cpu_kernel as ck
            ck.available()
        self.cpu_kernel_calls = 0             # decode attentions (one per layer and step) it ran
        if decode_graphs not in (None, "capture", "static"):
            raise ValueError(f"decode_graphs must be None, 'capture' or 'static', got {decode_graphs!r}")
        if decode_graphs is not None and c.sliding_window is not None:
            raise ValueError("the static decode path has no sliding window; run this model eagerly")
        # the static path's padding rows write into one extra block, beyond the block manager's range
        shape = (num_blocks + (decode_graphs is not None), block_size, c.num_key_value_heads, c.head_dim)
        self.k_pools = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(c.num_hidden_layers)]
        self.v_pools = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(c.num_hidden_layers)]
        self.graphs = None
        self.graph_steps = 0                 # steps that took the static (graphed) decode path
        if fused_ops and decode_graphs is None:
            raise ValueError("the fused ops run in the graphed steps: set decode_graphs too")
        if decode_graphs is not None:
            from ..paged import triton_paged
            if fused_ops and not triton_paged.available(dev):
                raise ValueError(f"the fused ops need CUDA or TRITON_INTERPRET=1, not {dev}")
            self.graphs = DecodeGraphs(model, self.k_pools, self.v_pools, block_size, max_num_seqs,
                                       max_model_len or c.max_position_embeddings, scratch_block=num_blocks,
                                       use_kernels=triton_paged.available(dev),
                                       capture=decode_graphs == "capture", fused=fused_ops)
        self.prefill = None
        self.prefill_graph_steps = 0         # steps whose prompts took the prefill graphs
        if prefill_graphs is not None:
            if self.graphs is None:
                raise ValueError("prefill graphs run beside the decode graphs: set decode_graphs too")
            # each bucket's graph keeps logits for every prompt slot: 64 covers a step of many
            # short prompts (more than 64 new prompts in one step run eagerly)
            self.prefill = PrefillGraphs(model, self.k_pools, self.v_pools, num_blocks * block_size,
                                         prefill_graphs, min(max_num_seqs, 64), capture=decode_graphs == "capture",
                                         fused=fused_ops)

    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Run the eager kinds of step once on scratch blocks, before the first request: a prompt's
        first chunk next to a whole prompt, then a mixed step with the rest of the first prompt (the
        paged prefill kernel) beside a decode (the paged decode kernel, outside a graph). Triton
        compiles a kernel on its first call, a second or so each, which vLLM likewise spends at
        startup instead of inside a served step. The blocks written are free in the block manager;
        whoever gets them next overwrites what is there. Returns False (and runs nothing) when the
        pool or the model's context is too small for it."""
        bs = self.block_size
        long, short = 2 * bs + 3, bs + 1                  # uneven lengths: partial blocks, as served
        nb = math.ceil((long + 1) / bs)
        if 2 * nb > self.num_blocks or long + 1 > self.model.config.max_position_embeddings:
            return False
        a, b = Sequence([1] * long), Sequence([1] * short)
        a.block_table, b.block_table = list(range(nb)), list(range(nb, 2 * nb))
        first = ScheduledBatch()
        first.add(a, bs)                                  # a chunk: a's context is the chunk itself
        first.add(b, short)
        self.execute(first)
        a.num_computed_tokens, b.num_computed_tokens = bs, short
        b.append_token(1)
        mixed = ScheduledBatch()
        mixed.add(a, long - bs)                           # continues after cached tokens: paged prefill
        mixed.add(b, 1)
        self.execute(mixed)
        synchronize(self.model.device)
        return True

    def release(self) -> None:
        """Drop the pools (the engine's statistics stay readable); a GPU gets its memory back."""
        self.k_pools, self.v_pools = [], []
        self.graphs = self.prefill = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_pools + self.v_pools)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.model.device)
        dst = torch.tensor([d for _, d in copies], device=self.model.device)
        for pool in self.k_pools + self.v_pools:
            pool[dst] = pool[src]

    def prepare(self, batch: ScheduledBatch):
        """Host-side metadata of the packed forward: (ids, positions, PackedBatch, logits rows)."""
        bs = self.block_size
        ids, pos, slots, qstart, ctx, sample_at, tables = [], [], [], [0], [], [], []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            a = seq.num_computed_tokens
            b = a + n
            ids += seq.token_ids[a:b]
            pos += range(a, b)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs if p >= seq.num_cached_tokens else -1 for p in range(a, b)]
            qstart.append(qstart[-1] + n)
            ctx.append(b)
            tables.append(table)
            if b == len(seq):                       # every known token computed: sample the next
                sample_at.append(qstart[-1] - 1)
        width = max(len(t) for t in tables)
        dev = self.model.device
        meta = PackedBatch(
            self.k_pools, self.v_pools,
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            query_start=qstart, context_lens=ctx,
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32).to(dev),
            sliding_window=self.model.config.sliding_window, use_kernels=self.use_kernels,
            cpu_kernel=self.cpu_kernel)
        return (torch.tensor([ids], device=dev), torch.tensor([pos], device=dev), meta,
                torch.tensor(sample_at, dtype=torch.long, device=dev))

    def prepare_decode(self, batch: ScheduledBatch):
        """The static path's inputs (ids, positions, slots, context lengths, block tables) when every
        sequence of the batch computes its newest token and samples after it, and the graphs hold a
        batch that size; else None (the step runs eagerly)."""
        if self.graphs is None or len(batch) > self.graphs.max_batch:
            return None
        return self._decode_inputs(batch.seqs, batch.num_tokens)

    def _decode_inputs(self, seqs, num_tokens):
        bs = self.block_size
        ids, pos, slots, lens, tables = [], [], [], [], []
        for seq, n in zip(seqs, num_tokens):
            p = seq.num_computed_tokens
            if n != 1 or p + 1 != len(seq) or p < seq.num_cached_tokens:
                return None
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            lens.append(p + 1)
            tables.append(seq.block_table)
        return ids, pos, slots, lens, tables

    def prepare_split(self, batch: ScheduledBatch):
        """The prefill graphs' inputs: (rows of new whole prompts, their token lists, their slots, other
        rows, those rows' decode inputs) when every other row is a decode the decode graphs hold
        and the prompts fit the prefill graphs; else None (the step runs eagerly)."""
        if self.prefill is None:
            return None
        bs = self.block_size
        pre, dec = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            # computed from its first token to its last, no block of it cached: a new prompt (or a
            # preempted sequence's recompute), which samples after it; anything else must decode
            whole = seq.num_computed_tokens == 0 and n == len(seq) and seq.num_cached_tokens == 0
            (pre if whole else dec).append(i)
        total = sum(batch.num_tokens[i] for i in pre)
        if not pre or len(pre) > self.prefill.max_prompts or total > self.prefill.max_tokens:
            return None
        if len(dec) > self.graphs.max_batch:
            return None
        decode = self._decode_inputs([batch.seqs[i] for i in dec], [batch.num_tokens[i] for i in dec]) if dec else None
        if dec and decode is None:
            return None
        prompts = [batch.seqs[i].token_ids[:batch.num_tokens[i]] for i in pre]
        tables = [batch.seqs[i].block_table for i in pre]
        slots = [[t[p // bs] * bs + p % bs for p in range(len(p_))] for t, p_ in zip(tables, prompts)]
        return pre, prompts, slots, dec, decode

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, feed: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """Run the step; logits [num_sampling, vocab] (fp32) for the sequences that sample, in
        batch order.

        ``feed`` (async scheduling): (tokens, rows). A sequence whose newest token is still on the
        device (``PENDING`` in its token list) takes it from ``tokens[rows[i]]``, batch row i
        (-1: its tokens are all known); no value crosses to the host."""
        self.copy_blocks(batch.copies)
        if feed is not None and len(feed[1]) != len(batch):
            raise ValueError(f"feed has {len(feed[1])} rows for a batch of {len(batch)}")
        decode = self.prepare_decode(batch)
        if decode is not None:
            self.graph_steps += 1
            return self.graphs.run(*decode, feed=feed).float()
        split = self.prepare_split(batch)
        if split is not None:
            pre, prompts, slots, dec, decode = split
            self.prefill_graph_steps += 1
            parts = [self.prefill.run(prompts, slots)]         # new prompts: every token known
            if dec:
                self.graph_steps += 1
                parts.append(self.graphs.run(*decode, feed=feed and (feed[0], [feed[1][i] for i in dec])))
            where = {row: j for j, row in enumerate(pre + dec)}        # batch row -> row of the parts
            dev = self.model.device
            order, = staged(dev, torch.tensor([where[i] for i in range(len(batch))]))
            return torch.cat(parts)[order.to(dev, non_blocking=True)].float()
        ids, pos, meta, sample_at = self.prepare(batch)
        if feed is not None:           # a pending token is its sequence's newest: the chunk's last
            rows = [(meta.query_start[i + 1] - 1, r) for i, r in enumerate(feed[1]) if r >= 0]
            if rows:
                dst, src = torch.tensor(rows, dtype=torch.long).to(ids.device).unbind(1)
                ids[0, dst] = feed[0][src]
        logits = self.model(ids, positions=pos, cache=meta, backend=packed_paged_attention,
                            logits_indices=sample_at)
        self.cpu_kernel_calls += meta.cpu_kernel_calls
        return logits[0].float()


def num_kv_blocks(model, config: EngineConfig, max_model_len: int) -> int:
    """How many KV blocks the pool gets: given outright, from a byte budget, or (CUDA) what is
    left of ``gpu_memory_utilization`` of the GPU after the weights and the activation peak of a
    full step, measured; on a CPU ``gpu_memory_utilization`` of ``cpu_kv_cache_space_gib``, capped at
    what ``max_num_seqs`` full-length sequences could ever use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = kv_bytes_per_block(model, config.block_size)
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif model.device.type == "cuda":
        budget = _cuda_kv_budget(model, config, max_model_len)
    else:
        budget = config.gpu_memory_utilization * config.cpu_kv_cache_space_gib * 2**30
        cap = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
        budget = min(budget, cap * per_block)
    n = int(budget // per_block)
    if n < 1:
        raise ValueError(f"no room for a single KV block of {per_block} bytes (budget {budget:.0f} bytes)")
    return n


@torch.inference_mode()
def _cuda_kv_budget(model, config: EngineConfig, max_model_len: int) -> float:
    """Bytes for KV: utilization x total, less what others and the weights use and the activation
    peak of one step of max_num_batched_tokens tokens (measured by running it on a scratch pool)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()              # memory cached by earlier runs is free for the pool
    n = min(config.max_num_batched_tokens, max_model_len)
    scratch = ModelRunner(model, math.ceil(n / config.block_size), config.block_size)
    seq = Sequence([0] * n)
    seq.block_table = list(range(math.ceil(n / config.block_size)))
    batch = ScheduledBatch()
    batch.add(seq, n)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    scratch.execute(batch)
    activation_peak = torch.cuda.max_memory_allocated() - base
    del scratch
    free, total = torch.cuda.mem_get_info()
    used_now = total - free
    return total * config.gpu_memory_utilization - used_now - activation_peak
