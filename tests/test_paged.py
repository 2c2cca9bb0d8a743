"""PagedAttention: the Triton decode kernel against the gather reference, the paged cache against the
contiguous one token for token (block boundaries, prefix-cache hits, copy-on-write), and bad input.

The kernel runs under TRITON_INTERPRET=1 on a CPU (set by scripts/test), at small sizes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmops_lab
from llmops_lab.attention import naive_attention
from llmops_lab.config import ModelConfig
from llmops_lab.engine import BlockManager, NoFreeBlocksError, Sequence
from llmops_lab.paged import (PagedKVCache, gather_kv, paged_attention, paged_decode_reference,
                              paged_generate, paged_prefill_reference, store_kv, triton_paged)
from llmops_lab.paged.cache import blocks_for_step
from llmops_lab.paged.experiment import paged_inputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not triton_paged.available(DEV), reason="needs CUDA or TRITON_INTERPRET=1")
# The tiny model runs on the CPU, where the kernel runs only under the interpreter.
ATTENTION = ["gather", pytest.param("kernel", marks=pytest.mark.skipif(
    not triton_paged.available("cpu"), reason="needs TRITON_INTERPRET=1"))]
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def tiny(random_llama):
    return random_llama(TINY)


def prompt(B, S, seed=0):
    return torch.randint(2, TINY.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# -- kernel against reference -------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("H, Hkv, D, block_size, lens", [
    (8, 2, 32, 4, [37]),                 # GQA, odd length
    (4, 4, 16, 8, [8, 16, 24]),          # lengths exactly at block boundaries
    (8, 1, 16, 16, [1, 17, 50, 33]),     # batch of different lengths, one token, MQA
    (4, 2, 16, 64, [70, 5]),             # blocks longer than the kernel's tile (the GPU bench's 64)
])
def test_kernel_matches_gather_reference(num_splits, H, Hkv, D, block_size, lens):
    q, kp, vp, tables, ctx = paged_inputs(lens, H, Hkv, D, block_size, torch.float32, DEV)
    want, want_lse = paged_decode_reference(q, kp, vp, tables, ctx, return_lse=True)
    got, lse = triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=num_splits, return_lse=True)
    assert (got - want).abs().max() < 2e-5 and (lse - want_lse).abs().max() < 2e-5


@needs_kernel
def test_kernel_bf16_more_splits_than_tiles():
    q, kp, vp, tables, ctx = paged_inputs([5, 40], 8, 2, 64, 16, torch.bfloat16, DEV)
    want = paged_decode_reference(q.float(), kp.float(), vp.float(), tables, ctx)
    got = triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=8)   # most splits are empty
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 3e-2


@needs_kernel
@pytest.mark.parametrize("num_splits", [2, 8, 9, 17])
def test_kernel_merges_any_number_of_splits(num_splits):
    """The merge reads the splits SPLITS_BLOCK (8) at a time: counts below, at, just past and two
    blocks past it, with empty splits among them (the short rows)."""
    q, kp, vp, tables, ctx = paged_inputs([300, 3, 129], 4, 2, 16, 16, torch.float32, DEV)
    want, want_lse = paged_decode_reference(q, kp, vp, tables, ctx, return_lse=True)
    got, lse = triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=num_splits, return_lse=True)
    assert (got - want).abs().max() < 2e-5 and (lse - want_lse).abs().max() < 2e-5


@pytest.mark.gpu
def test_one_merge_variant_for_every_split_count(compiled_variants):
    """On a GPU: the merge kernel compiles once whatever the split count (an eager engine step picks
    its count from its longest context; a new variant would compile inside that step)."""
    q, kp, vp, tables, ctx = paged_inputs([600, 40], 8, 2, 64, 16, torch.bfloat16, "cuda")
    triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=2)
    before = compiled_variants(triton_paged.merge_splits_kernel)
    for n in (3, 4, 8, 9, 16, 33):
        triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=n)
    assert compiled_variants(triton_paged.merge_splits_kernel) == before


def test_reference_equals_attention_on_the_contiguous_cache():
    lens = [13, 32]
    q, kp, vp, tables, ctx = paged_inputs(lens, 4, 2, 16, 8, torch.float32, DEV)
    out = paged_decode_reference(q, kp, vp, tables, ctx)
    for b, n in enumerate(lens):
        k, v = gather_kv(kp, tables[b:b + 1], n), gather_kv(vp, tables[b:b + 1], n)
        assert (out[b] - naive_attention(q[b:b + 1, :, None], k, v)[0, :, 0]).abs().max() < 1e-5


def test_store_then_gather_round_trips_and_skips_negative_slots():
    kp, vp = torch.zeros(4, 2, 4, 8), torch.zeros(4, 2, 4, 8)
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    table = torch.tensor([[3, 1]])
    slots = torch.tensor([12, 13, 14, 15, 4, -1])            # positions 0..4 in blocks 3, 1; one skipped
    store_kv(k, v, kp, vp, slots)
    got = gather_kv(kp, table, 5)[0].transpose(0, 1)         # [5, Hkv, D]
    assert torch.equal(got, k[:5]) and torch.equal(gather_kv(vp, table, 5)[0].transpose(0, 1), v[:5])
    assert kp[1, :, 1:].abs().sum() == 0                     # nothing written for the -1 slot


def test_prefill_reference_is_causal_attention_over_the_context():
    q, kp, vp, tables, ctx = paged_inputs([21, 21], 4, 2, 16, 8, torch.float32, DEV)
    qs = torch.randn(2, 4, 5, 16, device=DEV)                 # the last 5 positions of each row
    got = paged_prefill_reference(qs, kp, vp, tables, ctx)
    k, v = gather_kv(kp, tables, 21), gather_kv(vp, tables, 21)
    assert (got - naive_attention(qs, k, v, is_causal=True)).abs().max() < 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_kernel_matches_gather_reference(dtype):
    from llmops_lab.paged.triton_prefill import paged_prefill
    q, kp, vp, tables, ctx = paged_inputs([21, 40], 4, 2, 16, 8, dtype, DEV)
    qs = torch.randn(2, 4, 19, 16, device=DEV).to(dtype)     # the last 19 positions of each row
    want = paged_prefill_reference(qs.float(), kp.float(), vp.float(), tables, ctx)
    assert (paged_prefill(qs, kp, vp, tables, ctx).float() - want).abs().max() < TOL[dtype]


@needs_kernel
def test_kernels_read_a_head_dim_that_is_not_contiguous():
    """The kernels take no stride along D: a D-major q or pool gave wrong numbers from the prefill
    kernel with no error (found by a bad-input probe), and the decode kernel refused it."""
    from llmops_lab.paged.triton_prefill import paged_prefill
    d_major = lambda t: t.mT.contiguous().mT                 # the same values, D's stride not 1
    q, kp, vp, tables, ctx = paged_inputs([21, 40], 4, 2, 16, 8, torch.float32, DEV)
    qs = torch.randn(2, 4, 19, 16, device=DEV)
    want = paged_prefill_reference(qs, kp, vp, tables, ctx)
    assert (paged_prefill(d_major(qs), kp, vp, tables, ctx) - want).abs().max() < 2e-5
    assert (paged_prefill(qs, d_major(kp), d_major(vp), tables, ctx) - want).abs().max() < 2e-5
    want = paged_decode_reference(q, kp, vp, tables, ctx)
    got = triton_paged.paged_decode(d_major(q), d_major(kp), d_major(vp), tables, ctx)
    assert (got - want).abs().max() < 2e-5


def test_paged_decode_on_a_cpu_reads_any_layout():
    """The C kernel reads keys and values with one set of strides, D consecutive: other layouts
    raised from it; they go to another path now and give the reference's numbers."""
    from llmops_lab.paged import paged_decode
    d_major = lambda t: t.mT.contiguous().mT
    q, kp, vp, tables, ctx = paged_inputs([21, 40], 4, 2, 32, 8, torch.float32, "cpu")
    want = paged_decode_reference(q, kp, vp, tables, ctx)
    for k, v in ((d_major(kp), d_major(vp)), (kp, torch.cat([vp, vp], -1)[..., :32])):
        assert (paged_decode(q, k, v, tables, ctx) - want).abs().max() < 2e-5


@needs_kernel
def test_prefill_kernel_refuses_what_it_would_misread():
    """Found by a bad-input probe: a context shorter than the queries gave finite numbers, S = 0 an
    IndexError, mixed dtypes an error from inside Triton, and fp64 ran."""
    from llmops_lab.paged.triton_prefill import paged_prefill
    _, kp, vp, tables, ctx = paged_inputs([10, 7], 4, 2, 16, 4, torch.float32, DEV)
    for fn in (paged_prefill, paged_prefill_reference):
        with pytest.raises(ValueError, match="must hold its 8 queries"):
            fn(torch.randn(2, 4, 8, 16, device=DEV), kp, vp, tables, ctx.cpu())
        with pytest.raises(ValueError, match="no query"):
            fn(torch.randn(2, 4, 0, 16, device=DEV), kp, vp, tables, ctx)
    q = torch.randn(2, 4, 3, 16, device=DEV)
    for args in ((q, kp.half(), vp.half()), (q.double(), kp.double(), vp.double())):
        with pytest.raises(TypeError, match="one dtype"):
            paged_prefill(*args, tables, ctx)


# -- the paged cache in the runtime --------------------------------------------------------------
CONTIGUOUS = {}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("S, block_size", [(7, 8), (8, 8), (16, 4), (17, 8)])
def test_greedy_paged_equals_contiguous(tiny, attention, S, block_size):
    ids = prompt(2, S)
    if S not in CONTIGUOUS:                                   # the contiguous run, once per prompt
        CONTIGUOUS[S] = tiny.generate(ids, max_new_tokens=8, stop_token_ids=())
    cache = PagedKVCache.for_model(tiny, 2, num_blocks=16, block_size=block_size)
    got = paged_generate(tiny, ids, 8, cache=cache, attention=attention)
    assert torch.equal(got, CONTIGUOUS[S])
    cache.check()
    cache.release()
    assert cache.num_free_blocks == 16


@pytest.mark.parametrize("attention", ATTENTION)
def test_full_prefix_hit_allocates_no_prompt_blocks(tiny, attention):
    ids = prompt(1, 16, seed=3)                              # exactly two blocks of 8
    cache = PagedKVCache.for_model(tiny, 2, num_blocks=12, block_size=8)
    first = paged_generate(tiny, ids, 6, cache=cache, attention=attention)
    free = cache.num_free_blocks
    assert cache.add_prompts(ids) == 15                       # every block cached; the last token reruns
    assert cache.num_free_blocks == free and cache.block_manager.prefix_hits == 2
    cache.release()
    second = paged_generate(tiny, ids, 6, cache=cache, attention=attention)
    assert torch.equal(first, second) and torch.equal(first, tiny.generate(ids, max_new_tokens=6, stop_token_ids=()))
    assert cache.block_tables()[0][:2] == cache.live[0].block_table[:2]
    cache.check()


def test_partial_prefix_hit_and_identical_rows_in_one_batch(tiny):
    ids = torch.cat([prompt(1, 12, seed=4)] * 2)              # row 1 finds row 0's full block
    cache = PagedKVCache.for_model(tiny, 2, num_blocks=12, block_size=8)
    got = paged_generate(tiny, ids, 5, cache=cache, attention="gather")
    assert cache.block_manager.prefix_hits == 1 and cache.cached_tokens == [0, 8]
    assert torch.equal(got, tiny.generate(ids, max_new_tokens=5, stop_token_ids=()))


@pytest.mark.parametrize("attention", ATTENTION)
def test_copy_on_write_after_fork(tiny, attention):
    ids = prompt(1, 11, seed=5)                               # last block (of 8) half full: shared
    cache = PagedKVCache.for_model(tiny, 2, num_blocks=8, block_size=8, attention=attention)
    with torch.no_grad():
        assert cache.add_prompts(ids) == 0
        tiny(ids, cache=cache, backend=paged_attention)
        cache.fork(2)
        shared = cache.block_tables()
        assert shared[0] == shared[1] and cache.ref_counts()[shared[0][1]] == 2
        seqs = [ids[0].tolist(), ids[0].tolist()]
        for step, toks in enumerate([(7, 9), (20, 20), (5, 6)]):
            cache.append_tokens(list(toks))
            if step == 0:                                     # the first writer copied the shared block
                assert cache.block_tables()[0][1] != cache.block_tables()[1][1]
            logits = tiny(torch.tensor(toks)[:, None], cache=cache, backend=paged_attention)[:, -1]
            for r in range(2):
                seqs[r].append(toks[r])
                want = tiny(torch.tensor([seqs[r]]))[0, -1]
                assert (logits[r] - want).abs().max() < 1e-4, (step, r)
    cache.check()


@pytest.mark.parametrize("attention", ATTENTION)
def test_parallel_samples_share_the_prompt(tiny, attention):
    ids = prompt(1, 20, seed=6)
    cache = PagedKVCache.for_model(tiny, 3, num_blocks=16, block_size=8)
    out = paged_generate(tiny, ids, 6, cache=cache, n=3, temperature=1.0, attention=attention,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 26) and all(torch.equal(r[:20], ids[0]) for r in out)
    tables = cache.block_tables()
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # full prompt blocks stored once
    assert len({t[2] for t in tables}) == 3                   # the partial one copied on write
    assert all(n == 3 for b, n in cache.ref_counts().items() if b in tables[0][:2])
    cache.check()


def test_embedded_target_greedy_paged_equals_contiguous():
    try:
        model = llmops_lab.load_model("target")
    except FileNotFoundError:
        pytest.skip("embedded target not trained yet")
    ids = torch.tensor([[0] + list(range(40, 55))], device=model.device)  # 16 tokens: exactly one block
    want = model.generate(ids, max_new_tokens=6, stop_token_ids=())
    assert torch.equal(paged_generate(model, ids, 6, block_size=16, num_blocks=4), want)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 3, 24])
def test_block_size_must_be_a_power_of_two(tiny, bad):
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache.for_model(tiny, 1, num_blocks=8, block_size=bad)
    kp = torch.zeros(4, 2, bad or 1, 16)
    if bad:
        with pytest.raises(ValueError, match="power of two"):
            triton_paged.paged_decode(torch.zeros(1, 4, 16), kp, kp, torch.zeros(1, 1, dtype=torch.int32),
                                      torch.ones(1, dtype=torch.int32))


def test_outgrowing_the_pool_is_a_signal_not_corruption(tiny):
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=2, block_size=4)
    with pytest.raises(NoFreeBlocksError):                    # a 9-token prompt needs 3 blocks
        cache.add_prompts(prompt(1, 9))
    with pytest.raises(NoFreeBlocksError):                    # all rows or none
        cache.add_prompts(prompt(2, 5))
    assert cache.num_free_blocks == 2 and not cache.live
    with pytest.raises(NoFreeBlocksError):                    # 6 + 3 tokens: the third block is refused
        paged_generate(tiny, prompt(1, 6), 4, cache=cache, attention="gather")
    s = cache.seqs[0]
    assert len(s) == 8 and len(s.block_table) == 2            # the refused token was never appended
    cache.check()
    pools = [p.clone() for p in cache.k_pools]
    with pytest.raises(NoFreeBlocksError):
        cache.append_tokens([3])
    assert len(s) == 8 and all(torch.equal(a, b) for a, b in zip(pools, cache.k_pools))


def test_a_prompt_longer_than_the_context_takes_no_block(tiny):
    """The model's forward refuses it, but only after add_prompts had given it blocks, which stayed
    held (found by a bad-input probe): a cache from for_model knows the context and refuses first."""
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=20, block_size=16)
    with pytest.raises(ValueError, match="257 tokens exceed the model's context of 256"):
        cache.add_prompts(prompt(1, TINY.max_position_embeddings + 1))
    assert cache.num_free_blocks == 20 and not cache.live and not cache.seqs and not cache.block_manager.cached
    assert cache.add_prompts(prompt(1, TINY.max_position_embeddings)) == 0   # the whole context fits
    free = cache.num_free_blocks
    with pytest.raises(ValueError, match="no room for another in the model's context of 256"):
        cache.append_tokens([5])                 # a decode step past the context, likewise
    assert cache.num_free_blocks == free and len(cache.seqs[0]) == TINY.max_position_embeddings


def test_freeing_twice_is_an_error(tiny):
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=4, block_size=4)
    cache.add_prompts(prompt(1, 6))
    s = cache.seqs[0]
    cache.free(s)
    with pytest.raises(RuntimeError, match="twice"):
        cache.free(s)
    assert cache.num_free_blocks == 4


def test_forward_without_slots_is_refused(tiny):
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=4, block_size=4)
    cache.add_prompts(prompt(1, 6))
    with pytest.raises(ValueError, match="add_prompts/append_tokens"):
        tiny(prompt(1, 7), cache=cache)


def test_prefix_hash_chain_survives_a_partial_last_block():
    """Regression: a prompt ending in a partial block broke the hash chain, so a later prompt that
    merely *started* with that block's tokens was served another context's KV."""
    bm = BlockManager(8, 4)
    a = Sequence([1, 2, 3, 4, 5, 6])
    bm.allocate(a)
    for t in (7, 8):
        a.append_token(t)
        bm.append_slot(a)
    c = Sequence([5, 6, 7, 8, 9])                            # same tokens as a's block 1, at position 0
    assert bm.allocate(c) == 0 and c.block_table[0] != a.block_table[1]
    d = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 1])               # the true prefix still hits both blocks
    assert bm.allocate(d) == 8 and d.block_table[:2] == a.block_table


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 12), min_size=1, max_size=4), forks=st.lists(st.integers(0, 3), max_size=4),
       steps=st.integers(1, 6))
def test_blocks_for_step_is_exactly_what_a_step_takes(lens, forks, steps):
    bm = BlockManager(64, 4)
    seqs = []
    for n in lens:
        s = Sequence(list(range(n)))
        bm.allocate(s)
        seqs.append(s)
    for i in forks:                                           # parallel samples share blocks
        child = Sequence(seqs[i % len(seqs)].token_ids)
        bm.fork(seqs[i % len(seqs)], child)
        seqs.append(child)
    for _ in range(steps):
        need, free = blocks_for_step(bm, seqs), bm.num_free_blocks
        for s in seqs:
            s.append_token(1)
            bm.append_slot(s)
        assert free - bm.num_free_blocks == need
    bm.check_invariants(seqs)


def test_simulated_memory_agrees_with_the_formulas():
    from llmops_lab.paged import simulate
    reqs = simulate.sample_requests(200, max_len=512, seed=1)
    assert all(1 <= r.prompt_len and 1 <= r.output_len and r.total <= 512 for r in reqs)
    for bs in (1, 16, 64):
        r = simulate.memory_report(reqs, 512, bs, when="during")
        assert r["reserved_tokens"]["paged"] == r["paged_formula_tokens"]
        assert abs(r["waste"]["paged"] - r["waste_formula"]["paged"]) < 1e-12
        assert r["waste"]["paged"] < r["waste"]["contiguous, oracle"] < r["waste"]["contiguous, max length"]
    share = simulate.parallel_sampling_blocks(10, [3, 5, 9], block_size=4)   # prompt: 2 full + 1 partial block
    assert share == {"shared_blocks": 2 + 2 + 2 + 3, "copies": 2, "separate_blocks": 4 + 4 + 5}  # 13, 15, 19 tokens


def test_a_busy_server_snapshot_is_the_time_average():
    """when="during" finds requests in proportion to the steps they spend in the server, so its
    waste is the time average over every decode step of every request (what the vLLM paper's
    figure 2 reports). Catching every request once, at a random step, over-counts the short ones."""
    from llmops_lab import formulas
    from llmops_lab.paged import simulate
    reqs = simulate.sample_requests(2000, max_len=2048, seed=0)
    steps = [(r, r.prompt_len + k) for r in reqs for k in range(1, r.output_len + 1)]
    used = sum(s for _, s in steps)
    exact = {"contiguous, max length": 1 - used / (2048 * len(steps)),
             "contiguous, oracle": 1 - used / sum(r.total for r, _ in steps),
             "paged": 1 - used / sum(formulas.paged_reserved_tokens(s, 16) for _, s in steps)}
    snap = simulate.memory_report(reqs, 2048, 16, when="during")["waste"]
    for name, w in exact.items():     # drawing each request once gave 0.841, 0.328, 0.022
        assert abs(snap[name] - w) < 0.005, (name, snap[name], w)


def test_a_refused_batch_leaves_no_uncomputed_block_in_the_prefix_cache(tiny):
    cache = PagedKVCache.for_model(tiny, 2, num_blocks=3, block_size=4)
    ids = torch.cat([prompt(1, 8, seed=7), prompt(1, 8, seed=8)])      # 2 + 2 blocks, 3 free
    with pytest.raises(NoFreeBlocksError):
        cache.add_prompts(ids)
    assert not cache.block_manager.cached and cache.num_free_blocks == 3
    out = paged_generate(tiny, ids[:1], 3, cache=cache, attention="gather")
    assert cache.block_manager.prefix_hits == 0
    assert torch.equal(out, tiny.generate(ids[:1], max_new_tokens=3, stop_token_ids=()))


def test_paged_attention_refuses_lengths_and_tables_it_would_misread():
    """A context of 0 used to return zeros, one shorter than the queries zero rows, a table entry
    past the pool an IndexError from inside the gather, a float length a silent truncation."""
    q, kp, vp, bt, lens = paged_inputs([5, 9], 4, 2, 16, 4)
    for fn in (paged_decode_reference, llmops_lab.paged.paged_decode):
        with pytest.raises(ValueError, match="context_lens"):
            fn(q, kp, vp, bt, torch.tensor([0, 9], dtype=torch.int32))
        with pytest.raises(ValueError, match="context_lens"):
            fn(q, kp, vp, bt, torch.tensor([5, 9 + 4 * bt.shape[1]], dtype=torch.int32))
        bad = bt.clone()
        bad[1, 0] = kp.shape[0]
        with pytest.raises(ValueError, match="outside the pool"):
            fn(q, kp, vp, bad, lens)
        with pytest.raises(TypeError, match="integers"):
            fn(q, kp, vp, bt, lens.float())
        bad[1, 0], bad[0, -1] = bt[1, 0], -1          # padding past row 0's 5 tokens (the gather reads it)
        with pytest.raises(ValueError, match="outside the pool"):
            fn(q, kp, vp, bad, lens)
    with pytest.raises(ValueError, match="queries"):
        paged_prefill_reference(q[:, :, None].expand(-1, -1, 6, -1), kp, vp, bt, lens)


def test_paged_generate_refuses_what_it_would_ignore(tiny):
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="attention must be"):
        paged_generate(tiny, prompt(1, 5), 2, cache=cache, attention="bogus")
    with pytest.raises(ValueError, match="has its own"):
        paged_generate(tiny, prompt(1, 5), 2, cache=cache, block_size=8)
    with pytest.raises(ValueError, match="has its own"):
        paged_generate(tiny, prompt(1, 5), 2, cache=cache, num_blocks=3)
    assert cache.num_free_blocks == 8 and not cache.live
    small = PagedKVCache.for_model(tiny, 1, num_blocks=2, block_size=4)
    with pytest.raises(NoFreeBlocksError, match="cache.release"):
        paged_generate(tiny, prompt(1, 6), 4, cache=small, attention="gather")
    small.release()                        # what the message says: then the pool serves again
    assert paged_generate(tiny, prompt(1, 3), 2, cache=small, attention="gather").shape == (1, 5)


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_median=0), "prompt_median must be a finite number > 0, got 0"),
    (dict(prompt_median=float("nan")), "prompt_median must be"),
    (dict(output_median=-3), "output_median must be a finite number > 0, got -3"),
    (dict(output_median=float("inf")), "output_median must be"),
    (dict(sigma=-1), "sigma must be a finite number >= 0, got -1"),
    (dict(sigma=float("nan")), "sigma must be"),
])
def test_sample_requests_refuses_bad_lengths(kw, match):
    from llmops_lab.paged import simulate
    with pytest.raises(ValueError, match=match):
        simulate.sample_requests(5, **kw)


def test_sample_requests_sigma_zero_gives_the_medians():
    from llmops_lab.paged import simulate
    assert set(simulate.sample_requests(4, prompt_median=10, output_median=20, sigma=0)) == {simulate.Request(10, 20)}


@pytest.mark.parametrize("requests, max_len, match", [
    ([], 512, "no requests"),
    (None, 0, "max_len must be an integer >= 1, got 0"),
])
def test_memory_report_refuses_nothing_to_report(requests, max_len, match):
    from llmops_lab.paged import simulate
    requests = simulate.sample_requests(5, max_len=64) if requests is None else requests
    with pytest.raises(ValueError, match=match):
        simulate.memory_report(requests, max_len, 16)


@needs_kernel
def test_kernel_refuses_a_max_context_len_it_would_truncate():
    """A max_context_len under the longest context sized the splits short: the tail was never read
    (found by an adversarial probe). Where the lengths are on the host, it is refused."""
    q, kp, vp, tables, ctx = paged_inputs([60], 2, 1, 16, 4, torch.float32, DEV)
    for bad, match in ((8, "shorter"), (0, "max_context_len"), (2.5, "max_context_len")):
        with pytest.raises(ValueError, match=match):
            triton_paged.paged_decode(q, kp, vp, tables, ctx.cpu(), num_splits=2, max_context_len=bad)
    with pytest.raises(ValueError, match="num_splits"):
        triton_paged.paged_decode(q, kp, vp, tables, ctx, num_splits=2.5)


class interrupted:
    """The model's forward fails (Ctrl-C, out of memory) in its last layer once its first
    ``after_calls`` forwards have gone through: the earlier layers have written their keys and values
    into the pool, the last one has not."""

    def __init__(self, model, after_calls=0):
        self.layer, self.left = model.model.layers[-1], after_calls

    def forward(self, *args, **kwargs):
        if self.left == 0:
            raise RuntimeError("out of memory")
        self.left -= 1
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __enter__(self):
        self.layer.forward = self.forward

    def __exit__(self, *exc):
        del self.layer.forward


def test_a_failed_forward_leaves_no_uncomputed_block_in_the_prefix_cache(tiny):
    """A prompt's full blocks became prefix-cache hits when they were allocated, before the forward
    wrote their keys and values: after a failed prefill (or a failed decode step that filled a
    block) and cache.release(), the same prompt was served from unwritten slots (cached_tokens [16],
    wrong tokens). Now a block is a hit only once the forward has written it in every layer."""
    ids = prompt(1, 16, seed=9)
    want = tiny.generate(ids, max_new_tokens=5, stop_token_ids=())
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=40, block_size=4)
    with interrupted(tiny), pytest.raises(RuntimeError, match="out of memory"):
        paged_generate(tiny, ids, 5, cache=cache, attention="gather")
    cache.release()
    assert torch.equal(paged_generate(tiny, ids, 5, cache=cache, attention="gather"), want)
    assert cache.cached_tokens == [0]
    cache.release()                                           # now computed: a hit
    assert torch.equal(paged_generate(tiny, ids, 5, cache=cache, attention="gather"), want)
    assert cache.cached_tokens == [16]
    cache.reset()
    # decode: the first new token fills block 4 of a 15-token prompt, and that step fails
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=40, block_size=4)
    with interrupted(tiny, after_calls=1), pytest.raises(RuntimeError, match="out of memory"):
        paged_generate(tiny, ids[:, :15], 5, cache=cache, attention="gather")
    cache.release()
    longer = torch.cat([ids[:, :15], want[:, 16:17]], dim=1)  # the prompt and the token of the failed step
    got = paged_generate(tiny, longer, 4, cache=cache, attention="gather")
    assert cache.cached_tokens == [12]                        # blocks 1-3 were written, block 4 was not
    assert torch.equal(got, tiny.generate(longer, max_new_tokens=4, stop_token_ids=()))
    cache.check()


def test_paged_update_checks_the_new_keys_and_values(tiny):
    """Called directly, update copied one KV head into every head of the pool (and a size-1 head
    dim across the dim) without a word, and layer -1 wrote the last layer's pool."""
    cache = PagedKVCache.for_model(tiny, 1, num_blocks=8, block_size=4)
    cache.add_prompts(prompt(1, 3))                    # one row of 3 tokens to write
    Hkv, D = tiny.config.num_key_value_heads, tiny.config.head_dim
    for k, layer, match in ((torch.zeros(1, 1, 3, D), 0, "KV heads"), (torch.zeros(1, Hkv, 3, 1), 0, "dim"),
                            (torch.zeros(1, Hkv, 3, D), -1, "layer"), (torch.zeros(2, Hkv, 3, D), 0, "batch")):
        with pytest.raises(ValueError, match=match):
            cache.update(layer, k, k, 0)


@pytest.mark.parametrize("make, match", [
    (lambda m: PagedKVCache.for_model(m, 2, num_blocks=8, dtype=torch.float16), "dtype torch.float16"),
    (lambda m: PagedKVCache(2, 1, 16, 8, 16), "KV heads 1"),
    (lambda m: PagedKVCache(1, 2, 16, 8, 16), "layers 1"),
    (lambda m: PagedKVCache(2, 2, 8, 8, 16), "head dim 8"),
])
def test_paged_generate_refuses_a_cache_that_does_not_fit_the_model(tiny, make, match):
    """A cache of another dtype, KV head count, head dim or layer count failed deep in the forward
    (a raw index_put dtype error, a shape mismatch, an IndexError), its prompt holding blocks."""
    cache = make(tiny)
    with pytest.raises(ValueError, match=f"PagedKVCache does not fit the model: {match}"):
        paged_generate(tiny, prompt(1, 5), 2, cache=cache, attention="gather")
    assert not cache.live and cache.num_free_blocks == 8


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=4.0), "block_size must be a power of two >= 1, got 4.0"),
    (dict(block_size=True), "block_size must be a power of two >= 1, got True"),
    (dict(num_blocks=8.0), "num_blocks must be an integer >= 1, got 8.0"),
    (dict(max_new_tokens=2.5), "integers max_new_tokens"),
    (dict(n=True), "integers max_new_tokens >= 1 and n >= 1"),
])
def test_paged_generate_refuses_sizes_that_are_not_integers(tiny, kw, match):
    """block_size=4.0 failed with "unsupported operand type(s) for &", True passed as 1, and a
    fractional max_new_tokens got past the prefill before range() refused it."""
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        paged_generate(tiny, prompt(1, 5), attention="gather", **kw)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.parallel_sampling_blocks(10, [-3, 3], 16), "output_lens must be one or more integers >= 0"),
    (lambda s: s.parallel_sampling_blocks(10, [], 16), "output_lens must be one or more"),
    (lambda s: s.parallel_sampling_blocks(10, [2.5], 16), "output_lens must be"),
    (lambda s: s.parallel_sampling_blocks(0, [3], 16), "prompt_len must be an integer >= 1, got 0"),
    (lambda s: s.sample_requests(2, 100.5), "max_len must be an integer >= 2, got 100.5"),
    (lambda s: s.sample_requests(2.5), "n must be an integer >= 1, got 2.5"),
    (lambda s: s.sample_requests(2, output_median="200"), "output_median must be"),
    (lambda s: s.Request(99.5, 1), "prompt_len must be an integer >= 1, got 99.5"),
    (lambda s: s.Request(5, -1), "output_len must be an integer >= 0, got -1"),
    (lambda s: s.memory_report([s.Request(5, 300)], 100, 16, when="during"), "shorter than a request"),
    (lambda s: s.memory_report([(5, 3)], 100, 16), "Request"),
])
def test_simulate_refuses_lengths_it_would_misread(call, match):
    """parallel_sampling_blocks(10, [-3, 3], 16) returned nonsense and [] failed with "num_blocks must
    be >= 1"; sample_requests(2, 100.5) returned Request(prompt_len=99.5, ...); a max_len under a
    request's length gave a negative waste from a "during" snapshot."""
    from llmops_lab.paged import simulate
    with pytest.raises((ValueError, TypeError), match=match):
        call(simulate)


def test_during_snapshot_of_a_request_without_output_is_its_prompt():
    """A request with 0 output tokens made when="during" fail with "empty range for randrange()": it
    has no decode step to land on, so it holds its prompt."""
    from llmops_lab.paged import simulate
    reqs = [simulate.Request(5, 0), simulate.Request(3, 4)]
    found, lens = simulate.in_flight(reqs * 20, "during")
    for r, n in zip(found, lens):
        assert n == 5 if r.output_len == 0 else 4 <= n <= 7
    assert {r.output_len for r in found} == {0, 4}   # found too, for its one step (the prefill)
    lens = simulate.current_lengths(reqs, "during")
    assert simulate.memory_report(reqs, 100, 4, when="during")["used_tokens"] == sum(lens)
    assert simulate.parallel_sampling_blocks(10, [0], 4) == {"shared_blocks": 3, "copies": 0, "separate_blocks": 3}
