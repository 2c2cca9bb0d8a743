"""Measuring paged attention: decode-attention latency and bandwidth, and a model's decode step.

Kernel level: the same keys and values held twice, contiguous [B, Hkv, S, D] and paged in blocks
scattered at random over the pool (a fragmented pool, the case paging exists for); SDPA reads the
first, the gather reference, our Triton kernel and (on a CPU) our C kernel the second;
``python -m llmops_lab.paged.experiment`` times the C kernel on this CPU against the other two.
Bytes read by one decode call are 2 x B x Hkv x S x D x sizeof (every key and value once), so
bandwidth = bytes / time.
Model level: seconds per greedy decode step of the runtime with the contiguous ``KVCache`` against
the ``PagedKVCache`` (prefill excluded).
"""
from __future__ import annotations

import torch

from .. import measure
from ..attention import sdpa_attention
from ..kv import KVCache
from . import cpu_kernel, triton_paged
from .attention import gather_kv, paged_attention
from .cache import PagedKVCache


def paged_inputs(lens, H: int, Hkv: int, D: int, block_size: int, dtype=torch.float32, device="cpu",
                 seed: int = 0, spare_blocks: int = 3):
    """Random q [B, H, D] and pools whose blocks are handed to the sequences in shuffled order.

    Returns:
        (q, k_pool, v_pool, block_tables [B, max_blocks] int32, context_lens [B] int32).
    """
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare_blocks
    pool = lambda: torch.randn(num_blocks, Hkv, block_size, D, generator=g).to(device=device, dtype=dtype)
    k_pool, v_pool = pool(), pool()
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lens), H, D, generator=g).to(device=device, dtype=dtype)
    return q, k_pool, v_pool, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def contiguous_and_paged(B: int, H: int, Hkv: int, context: int, D: int, block_size: int,
                         dtype=torch.bfloat16, device="cpu", seed: int = 0) -> dict:
    """One decode batch's q and KV, held contiguous (k, v) and paged (k_pool, v_pool, block_tables)."""
    if context % block_size:
        raise ValueError(f"context {context} must be a multiple of block_size {block_size} here")
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    q, k, v = rand(B, H, D), rand(B, Hkv, context, D), rand(B, Hkv, context, D)
    nb = context // block_size
    perm = torch.randperm(B * nb, generator=g, device=device)   # block j of row b lives at perm[b*nb + j]

    def to_pool(x):
        pool = torch.empty(B * nb, Hkv, block_size, D, device=device, dtype=dtype)
        pool[perm] = x.view(B, Hkv, nb, block_size, D).transpose(1, 2).reshape(B * nb, Hkv, block_size, D)
        return pool

    return dict(q=q, k=k, v=v, k_pool=to_pool(k), v_pool=to_pool(v),
                block_tables=perm.view(B, nb).to(torch.int32),
                context_lens=torch.full((B,), context, dtype=torch.int32, device=device))


def kv_bytes_read(B: int, Hkv: int, context: int, D: int, dtype) -> int:
    """Bytes one decode-attention call must read: every key and value of every sequence once."""
    return 2 * B * Hkv * context * D * torch.empty((), dtype=dtype).element_size()


def decode_attention_latencies(B: int, H: int, Hkv: int, context: int, D: int, block_size: int = 16,
                               dtype=torch.bfloat16, device="cpu", repeats: int = 20,
                               kernel: bool | None = None, splits: tuple = (None, 2, 4)) -> dict:
    """Timings of one decode-attention call: SDPA on the contiguous cache, gather + SDPA on the
    paged one, on a CPU our C paged kernel (where it has a variant and a compiler built it), and
    (on a GPU, or when ``kernel``) our Triton paged kernel; with the max error of each against
    SDPA's output. On a GPU the kernel also runs with its tiles tuned, once per entry of ``splits``
    (None: as many splits as it picks itself).

    Returns:
        {name: {"timing": Timing, "max_err": float}}
    """
    x = contiguous_and_paged(B, H, Hkv, context, D, block_size, dtype, device)
    q4 = x["q"][:, :, None]
    impls = {
        "SDPA, contiguous cache": lambda: sdpa_attention(q4, x["k"], x["v"])[:, :, 0],
        "gather + SDPA (paged reference)": lambda: sdpa_attention(
            q4, gather_kv(x["k_pool"], x["block_tables"], context),
            gather_kv(x["v_pool"], x["block_tables"], context))[:, :, 0],
    }
    if torch.device(device).type == "cpu" and cpu_kernel.supports(x["q"], x["k_pool"], Hkv) and cpu_kernel.available():
        impls["ours: C paged decode (CPU)"] = lambda: cpu_kernel.paged_decode_cpu(
            x["q"], x["k_pool"], x["v_pool"], x["block_tables"], x["context_lens"], heads_first=True)
    if kernel if kernel is not None else torch.device(device).type == "cuda":
        impls["ours: Triton paged decode"] = lambda: triton_paged.paged_decode(
            x["q"], x["k_pool"], x["v_pool"], x["block_tables"], x["context_lens"], max_context_len=context)
        if torch.device(device).type == "cuda":       # the same kernel with its tiles chosen by timing,
            for n_split in splits:                   # and with the context split over n programs
                name = "ours: Triton paged decode, tuned tiles" + (f", {n_split} splits" if n_split else "")
                impls[name] = lambda n=n_split: triton_paged.paged_decode(
                    x["q"], x["k_pool"], x["v_pool"], x["block_tables"], x["context_lens"],
                    max_context_len=context, tune=True, num_splits=n)
    ref = impls["SDPA, contiguous cache"]().float()
    res = {}
    for name, fn in impls.items():
        err = (fn().float() - ref).abs().max().item()
        res[name] = {"timing": measure.time_fn(fn, warmup=3, repeats=repeats, device=device), "max_err": err}
    return res


def decode_step_latency(model, batch_size: int = 4, context: int = 256, block_size: int = 16,
                        new_tokens: int = 8, repeats: int = 3, attentions=None) -> dict:
    """Seconds per greedy decode step after a prompt of ``context`` tokens, with the contiguous
    ``KVCache`` and with the paged cache in each mode of ``attentions`` (default: gather, plus the
    kernel: Triton on a GPU, C on a CPU where it is built). Each repeat prefills untimed, then
    times ``new_tokens`` steps.

    Returns:
        {name: Timing of seconds per step}; tokens/s is batch_size / median.
    """
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, context), device=dev, generator=g)
    if attentions is None:
        c = model.config
        kernel = (triton_paged.available(dev) if dev.type == "cuda" else
                  dev.type == "cpu" and model.dtype == torch.float32 and cpu_kernel.available()
                  and cpu_kernel.supports_shape(c.num_attention_heads, c.num_key_value_heads, c.head_dim))
        attentions = ["gather"] + (["kernel"] if kernel else [])

    def contiguous():
        cache = KVCache.for_model(model, batch_size, context + new_tokens)
        return cache, model(ids, cache=cache, last_only=True)[:, -1], None

    def paged(attention):
        # the untimed prefill gathers: on a CPU under TRITON_INTERPRET=1 (the tests) the kernel mode's
        # prefill would run the Triton prefill kernel in the interpreter, minutes for a 256-token prompt
        cache = PagedKVCache.for_model(model, batch_size, block_size=block_size, attention="gather")
        cache.add_prompts(ids)
        logits = model(ids, cache=cache, backend=paged_attention, last_only=True)[:, -1]
        cache.attention = attention                       # the timed decode steps read as asked
        return cache, logits, paged_attention

    def steps(cache, logits, backend):
        for _ in range(new_tokens):
            tok = logits.argmax(-1)
            if backend is not None:
                cache.append_tokens(tok)
            logits = model(tok[:, None], cache=cache, backend=backend)[:, -1]

    setups = {"contiguous KVCache": contiguous}
    for att in attentions:
        name = f"paged, {'Triton' if dev.type == 'cuda' else 'C'} kernel" if att == "kernel" else "paged, gather + SDPA"
        setups[name] = lambda att=att: paged(att)
    out = {}
    with torch.inference_mode():
        for label, setup in setups.items():
            steps(*setup())                                   # warm-up
            samples = [measure.time_fn(steps, *setup(), warmup=0, repeats=1, device=dev).median / new_tokens
                       for _ in range(repeats)]
            out[label] = measure.Timing(samples)
    return out


def engine_decode_attention_seconds(rounds: int = 1) -> list[dict]:
    """The batching bench's CPU workload (``bench.batching``: 192 requests, 16 seats) replayed
    through the engine ``rounds`` times each way, the C kernel and the gather+SDPA reference as its
    decode attention in turn (the machine's drift falls on both): per run, whether the kernel ran,
    the seconds its decode attention took (summed over layers and steps, each call timed on the
    host: meaningful on a CPU only), the run's wall seconds and its throughput."""
    import time
    from ..bench import BenchContext
    from ..bench.batching import _model_and_tokens, workload_spec
    from ..engine import EngineConfig
    from ..engine.workload import make_workload, run_continuous
    from .varlen import PackedBatch
    ctx = BenchContext(device=torch.device("cpu"))
    _, model, tokens = _model_and_tokens(ctx)
    spec = workload_spec(ctx)
    seats = spec.pop("seats")
    wl = make_workload(tokens, **spec)
    spent = [0.0]
    real = PackedBatch._decode

    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            return real(self, *args)
        finally:
            spent[0] += time.perf_counter() - t0
    out = []
    PackedBatch._decode = timed
    try:
        for kernel in (True, False) * rounds:
            spent[0] = 0.0
            t0 = time.perf_counter()
            r = run_continuous(model, wl, EngineConfig(max_num_seqs=seats, max_num_batched_tokens=2048,
                                                       cpu_paged_kernel=kernel), progress=False)
            out.append({"kernel": kernel, "attention_s": spent[0], "wall_s": time.perf_counter() - t0,
                        "tok_s": r.throughput, "kernel_calls": r.engine.runner.cpu_kernel_calls})
    finally:
        PackedBatch._decode = real
    return out


def main(argv=None):
    """Time one decode-attention call (fp32, 16 rows, 8 query heads on 2 KV heads of 32): the kernel on
    PyTorch's threads and on one, the gather+SDPA reference and SDPA on a contiguous cache, per
    context length; with ``--engine N``, also the engine's decode attention over the batching
    bench's workload (``engine_decode_attention_seconds``), N runs each way."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m llmops_lab.paged.experiment", description=main.__doc__.split(":")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--engine", type=int, default=0, metavar="ROUNDS",
                    help="also replay the batching bench's workload ROUNDS times through the engine, kernel "
                         "and reference alternating, and print each run's decode-attention seconds")
    a = ap.parse_args(argv)
    if any(S < 16 or S % 16 for S in a.contexts):
        ap.error(f"contexts must be positive multiples of the block size, 16: got {a.contexts}")
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    if a.engine < 0:
        ap.error(f"--engine must be >= 0, got {a.engine}")
    if not cpu_kernel.available():
        raise SystemExit(f"the CPU decode kernel is unavailable: {cpu_kernel.reason()}")
    threads = torch.get_num_threads()
    print(f"{torch.get_num_threads()} threads; kernel shares them: {cpu_kernel.shares_torch_threads()}")
    for S in a.contexts:
        for n in dict.fromkeys((threads, 1)):
            torch.set_num_threads(n)
            try:
                res = decode_attention_latencies(16, 8, 2, S, 32, dtype=torch.float32, repeats=a.repeats)
            finally:
                torch.set_num_threads(threads)
            print(f"context {S}, {n} thread(s): " + ", ".join(
                f"{name} {r['timing'].median * 1e6:.0f} us" for name, r in res.items()))
    for r in engine_decode_attention_seconds(a.engine) if a.engine else ():
        print(f"engine, {'C kernel' if r['kernel'] else 'gather+SDPA reference'}: decode attention "
              f"{r['attention_s']:.2f} s of {r['wall_s']:.2f} s, {r['tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
