"""The continuous-batching engine: greedy outputs equal each prompt run alone, whatever the arrival
order, batch mix, chunking and preemptions; blocks all come back; bad input is refused per request."""
import math
import random

import pytest
import torch

import llmops_lab
from llmops_lab.config import ModelConfig
from llmops_lab.engine import LLM, EngineConfig, LLMEngine, SamplingParams, Scheduler, Sequence
from llmops_lab.engine.block_manager import BlockManager
from llmops_lab.engine.sequence import PENDING
from llmops_lab.engine.static import run_static_batch
from llmops_lab.engine.workload import make_workload, run_continuous, run_static
from llmops_lab.generation import generate

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=0, eos_token_id=1)
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(random_llama):
    return random_llama(TINY)


def prompts(n, lo=1, hi=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(2, TINY.vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(model, p, n):
    return generate(model, torch.tensor([p]), max_new_tokens=n, stop_token_ids=())[0, len(p):].tolist()


def run_all(engine, reqs, shuffle_seed=None, add_every=0):
    """Feed (id, prompt, params) into engine, optionally a few at a time between steps."""
    reqs = list(reqs)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(reqs)
    outs, i = {}, 0
    while i < len(reqs) or engine.has_unfinished_requests():
        for _ in range(len(reqs) if not add_every else add_every):
            if i < len(reqs):
                engine.add_request(*reqs[i])
                i += 1
        for o in engine.step():
            outs[o.request_id] = o
        engine.check()
    return outs


@pytest.mark.parametrize("cfg", [
    dict(max_num_seqs=16, max_num_batched_tokens=512),                    # whole prompts, big batches
    dict(max_num_seqs=3, max_num_batched_tokens=7),                       # tiny chunks, few seats
    dict(max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=12),   # pool runs dry: preemption
    dict(max_num_seqs=8, max_num_batched_tokens=33, block_size=1),
    dict(max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False, block_size=4),
])
def test_greedy_equals_alone(tiny, cfg):
    cfg = {"block_size": 8, **cfg}
    ps = prompts(12, seed=1)
    ps[5] = ps[3][:17] + ps[5]                      # shared prefixes: prefix-cache hits
    ps[7] = list(ps[3])
    lens = [1 + (i * 7) % 23 for i in range(len(ps))]
    eng = LLMEngine(tiny, config=EngineConfig(**cfg))
    reqs = [(str(i), p, SamplingParams(max_tokens=n, **GREEDY)) for i, (p, n) in enumerate(zip(ps, lens))]
    outs = run_all(eng, reqs, shuffle_seed=3, add_every=2)
    for i, (p, n) in enumerate(zip(ps, lens)):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, n), f"request {i}"
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    if cfg.get("num_kv_blocks") == 12:
        assert eng.scheduler.num_preemptions > 0


def test_chunked_prefill_interleaves_decodes(tiny):
    eng = LLMEngine(tiny, config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, block_size=8))
    eng.add_request("short", prompts(1, 3, 3)[0], SamplingParams(max_tokens=30, **GREEDY))
    eng.step()
    eng.add_request("long", prompts(1, 200, 200, seed=4)[0], SamplingParams(max_tokens=2, **GREEDY))
    decodes_during_prefill = 0
    while eng.requests["long"].seqs[0].num_computed_tokens < 200:
        eng.step()
        decodes_during_prefill += eng.step_stats[-1]["num_decode"]
        assert eng.step_stats[-1]["num_tokens"] <= 16
    assert decodes_during_prefill >= 10            # the short request kept decoding every step


def test_parallel_sampling_shares_prompt_blocks(tiny):
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=64))
    p = prompts(1, 10, 10)[0]                      # 2 full blocks + a partial one
    eng.add_request("a", p, SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=7))
    eng.step()                                     # prefill, fork, first tokens
    seqs = eng.requests["a"].seqs
    assert len(seqs) == 3
    assert seqs[0].block_table[:2] == seqs[1].block_table[:2] == seqs[2].block_table[:2]
    assert all(eng.block_manager.blocks[b].ref_count == 3 for b in seqs[0].block_table[:2])
    outs = run_all(eng, [])
    out = eng.get_output("a") if not outs else outs["a"]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 5 for o in out.outputs)
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, max_num_seqs=4))   # n seats, never more
    eng.add_request("x", p, SamplingParams(max_tokens=4, **GREEDY))
    eng.add_request("y", p, SamplingParams(n=3, max_tokens=4, seed=1))
    eng.add_request("z", p, SamplingParams(n=2, max_tokens=4, seed=2))
    while eng.has_unfinished_requests():
        eng.step()
        assert len(eng.scheduler.running) <= 4
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_greedy_n_samples_identical(tiny):
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4))
    p = prompts(1, 9, 9)[0]
    out = run_all(eng, [("a", p, SamplingParams(n=2, max_tokens=6, **GREEDY))])["a"]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == alone(tiny, p, 6)


def test_abort_frees_blocks(tiny):
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=40))
    for i, p in enumerate(prompts(4, 10, 20)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        eng.step()
    eng.abort("1")
    eng.abort_request(["3", "nope"])          # vLLM's name: several ids, an unknown one ignored
    assert eng.get_output("1").outputs[0].finish_reason == "abort"
    assert eng.get_output("3").outputs[0].finish_reason == "abort"
    eng.check()
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    with pytest.raises(KeyError):
        eng.abort("nope")


@pytest.mark.parametrize("overlap", [False, True])
def test_load_1000_requests(tiny, overlap):
    """1000 random requests through a small pool: none lost, every block back at the end (and so
    with async scheduling)."""
    rng = random.Random(0)
    eng = LLMEngine(tiny, config=EngineConfig(block_size=8, num_kv_blocks=48, max_num_seqs=32,
                                              max_num_batched_tokens=256, async_scheduling=overlap))
    reqs = [(str(i), p, SamplingParams(max_tokens=rng.randint(1, 6), **GREEDY))
            for i, p in enumerate(prompts(1000, 1, 60, seed=5))]
    outs = run_all(eng, reqs, add_every=25)
    assert len(outs) == 1000
    assert all(len(o.outputs[0].token_ids) == r[2].max_tokens for o, r in zip((outs[r[0]] for r in reqs), reqs))
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks


def test_request_too_big_for_pool_fails_alone(tiny):
    # said at start-up (vLLM refuses to start; the issue asks that such a request fail alone)
    with pytest.warns(UserWarning, match=r"the KV pool holds 24 tokens \(6 blocks of 4\), fewer than max_model_len"):
        eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=6, max_num_seqs=4))
    eng.add_request("big", prompts(1, 20, 20)[0], SamplingParams(max_tokens=40, **GREEDY))  # 60 > 24 slots
    eng.add_request("ok", prompts(1, 3, 3, seed=2)[0], SamplingParams(max_tokens=4, **GREEDY))
    outs = run_all(eng, [])
    assert outs["big"].outputs[0].finish_reason == "error" and "too small" in outs["big"].error
    assert outs["ok"].outputs[0].finish_reason == "length" and len(outs["ok"].outputs[0].token_ids) == 4
    assert eng.block_manager.num_free_blocks == 6


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty prompt"),
    ([5, 10_000], SamplingParams(), "token ids"),
    (list(range(2, 258)), SamplingParams(), "leaves no room"),
    (list(range(2, 100)) * 2, SamplingParams(), "whole pool"),
    ([5, 6], SamplingParams(stop=["x"]), "tokenizer"),
    ([5, 6], SamplingParams(n=5), "max_num_seqs"),
    # banned under min_tokens, it indexed past the logits in every later step: the engine wedged
    ([5, 6], SamplingParams(stop_token_ids=[320], min_tokens=1), "stop_token_ids"),
])
def test_bad_requests_refused(tiny, prompt, params, match):
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=32, max_num_seqs=4))
    eng.add_request("fine", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))
    with pytest.raises(ValueError, match=match):
        eng.add_request("bad", prompt, params)
    outs = run_all(eng, [])
    assert list(outs) == ["fine"] and eng.block_manager.num_free_blocks == 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(stop=[""]), "stop"), (dict(top_k=-5), "top_k"),
    # a NaN passes every comparison and would sample from NaN probabilities
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="0.7"), "temperature"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_tokens=1.5, max_tokens=4), "min_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(seed="1"), "seed"), (dict(stop_token_ids=[2.0]), "stop_token_ids"),
    # a scalar where a list goes was a raw "'int' object is not iterable"; a dict passed as its keys
    (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop=5), "stop"), (dict(stop={"a": 1}), "stop"),
    (dict(ignore_eos="no"), "ignore_eos"),              # truthy: it ignored the EOS it meant to keep
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    # vLLM's fields this engine does not implement: refused unless at vLLM's default
    (dict(logprobs=1), "logprobs=1 is not implemented"), (dict(prompt_logprobs=0), "prompt_logprobs"),
    (dict(repetition_penalty=1.2), "repetition_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=False), "frequency_penalty"), (dict(skip_special_tokens=False), "skip_special_tokens"),
    (dict(max_tokens=None), "max_tokens=None"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_vllm_defaults_spelled_out_are_accepted():
    sp = SamplingParams(logprobs=None, prompt_logprobs=None, presence_penalty=0, frequency_penalty=0.0,
                        repetition_penalty=1, skip_special_tokens=True, include_stop_str_in_output=False)
    assert sp == SamplingParams()


@pytest.fixture(scope="module")
def embedded():
    import copy
    m, tok = llmops_lab.load_model("target", device="cpu"), llmops_lab.load_tokenizer("target")
    pad_early = copy.deepcopy(m)                        # a model that emits <pad> (id 2) at its 4th token
    with torch.no_grad():
        pad_early.lm_head.weight[2] = pad_early.lm_head.weight[2272] * 3
    return m, tok, pad_early


def test_stop_strings_cut_the_text_where_they_matched(embedded):
    """The text is cut at the stop string found in the text the last token added (special tokens
    skipped, as in the returned text): it lost its last character when the two decodings differed.
    A stop string that appeared before min_tokens does not end the completion later, nor cut its
    text there (it did both); a special token as a stop string is refused (the text never holds
    it: stop_token_ids is the way)."""
    m, tok, pad_early = embedded
    llm = LLM(model=m, tokenizer=tok, num_kv_blocks=256)
    free = llm.generate("Hello world", SamplingParams(max_tokens=30, **GREEDY), use_tqdm=False)[0].outputs[0]
    first_newline = free.text.index("\n")
    o = llm.generate("Hello world", SamplingParams(max_tokens=30, stop="\n", **GREEDY), use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.text == free.text[:first_newline]
    late = llm.generate("Hello world", SamplingParams(max_tokens=30, stop="\n", min_tokens=10, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    text_at_10 = tok.decode(free.token_ids[:10], skip_special_tokens=True)
    assert len(late.token_ids) > 10 and late.text.startswith(text_at_10)        # the early newline kept
    assert late.text == free.text[:free.text.index("\n", len(text_at_10))]      # cut at the next one
    ids = LLM(model=pad_early, tokenizer=tok, num_kv_blocks=256).generate(
        "Hello world", SamplingParams(max_tokens=10, stop_token_ids=[2], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert ids.token_ids[-1] == 2 and ids.text == tok.decode(ids.token_ids, skip_special_tokens=True)
    bad = LLM(model=pad_early, tokenizer=tok, num_kv_blocks=256).generate(
        "Hello world", SamplingParams(max_tokens=10, stop="<pad>", **GREEDY), use_tqdm=False)[0]
    assert bad.error and "stop_token_ids" in bad.error
    # vLLM's rules (v1 detokenizer): a stop token's text is left out, its id kept; a stop string
    # counts only from the token after the first min_tokens (one that ends token min_tokens does not)
    k = next(i for i in range(1, 10) if free.token_ids[i] not in free.token_ids[:i]
             and tok.decode([free.token_ids[i]]).strip())
    by_id = llm.generate("Hello world", SamplingParams(max_tokens=30, stop_token_ids=[free.token_ids[k]], **GREEDY),
                         use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:k + 1] and by_id.stop_reason == free.token_ids[k]
    assert by_id.text == tok.decode(free.token_ids[:k], skip_special_tokens=True)
    j = next(n for n in range(1, 31) if "\n" in tok.decode(free.token_ids[:n], skip_special_tokens=True))
    at_j = llm.generate("Hello world", SamplingParams(max_tokens=30, stop="\n", min_tokens=j, **GREEDY),
                        use_tqdm=False)[0].outputs[0]               # the newline comes with token j itself
    assert len(at_j.token_ids) > j and at_j.text.startswith(tok.decode(free.token_ids[:j], skip_special_tokens=True))
    # include_stop_str_in_output keeps the stop token's text, or the text up to the stop string's end
    kept = llm.generate("Hello world", SamplingParams(max_tokens=30, stop_token_ids=[free.token_ids[k]],
                                                      include_stop_str_in_output=True, **GREEDY),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == tok.decode(free.token_ids[:k + 1], skip_special_tokens=True)
    kept = llm.generate("Hello world", SamplingParams(max_tokens=30, stop="\n", include_stop_str_in_output=True,
                                                      **GREEDY), use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[:first_newline + 1]


def test_the_end_of_sequence_token_stops_with_no_stop_reason():
    """vLLM reports EOS as finish "stop" with stop_reason None (a stop_token_ids entry as its id);
    its text is left out either way."""
    from types import SimpleNamespace

    from llmops_lab.engine.sampling_params import stop_reason
    class Seq(SimpleNamespace):
        def __len__(self):
            return 10
    seq = Seq(sampling_params=SamplingParams(stop_token_ids=[7]), num_completion_tokens=3, output_token_ids=[4, 5, 1])
    assert stop_reason(seq, 1, {1}, 100) == ("stop", None)
    assert stop_reason(seq, 7, {1}, 100) == ("stop", 7)
    seq.sampling_params = SamplingParams(ignore_eos=True)
    assert stop_reason(seq, 1, {1}, 100) == (None, None)


def test_a_stop_string_split_across_byte_tokens_is_found(embedded):
    """"é" is two byte tokens: the text before the second one ends in U+FFFD, which moved the search
    past the stop string, and generation ran on."""
    from llmops_lab.engine.sampling_params import stop_string_at
    _, tok, _ = embedded
    for text, stop in (("Hello é world", "é"), ("To be — or not", "—"), ("plain stop here", "stop")):
        ids = tok(text, add_special_tokens=False).input_ids
        found = next((n for n in range(1, len(ids) + 1) if stop_string_at(tok, ids[:n], stop) >= 0), None)
        assert found is not None and tok.decode(ids[:found]).endswith(stop), (text, stop)


def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Llama's, Mistral's): "▁" marks a space, and a string's first
    token is decoded without one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<s>", "</s>", "<unk>", "▁The", "▁cat", "▁sat", "▁sir", "▁on"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_completion_keeps_its_leading_space_after_its_prompt():
    """Decoded alone, " cat sat" read "cat sat" (prompt + text was not the sequence's text) and a stop
    string " sir" was refused as if it could never appear; vLLM decodes after the prompt's tail."""
    from llmops_lab.engine.sampling_params import completion_text, decode_completion, stop_string_at
    tok = metaspace_tokenizer()
    prompt = tok("The", add_special_tokens=False).input_ids
    out = tok(" cat sat sir on", add_special_tokens=False).input_ids
    assert tok.decode(out) == "cat sat sir on"                              # alone: the space is gone
    assert decode_completion(tok, out, [0] + prompt) == " cat sat sir on"
    assert tok.decode([0] + prompt + out, skip_special_tokens=True) == "The" + decode_completion(tok, out, prompt)
    assert completion_text(tok, out, None, "length", prompt_ids=prompt) == " cat sat sir on"
    assert completion_text(tok, out[:3], " sir", "stop", prompt_ids=prompt) == " cat sat"
    assert completion_text(tok, out[:3], " sir", "stop", True, prompt) == " cat sat sir"
    assert stop_string_at(tok, out[:3], " sir", prompt_ids=prompt) == len(" cat sat")
    assert decode_completion(tok, out, []) == "cat sat sir on"              # no prompt: nothing to read after


def test_stop_strings_are_checked_as_a_completion_decodes_them(tiny):
    eng = LLMEngine(tiny, tokenizer=metaspace_tokenizer())
    eng._check_stop_strings([" sir", "sir", " sat sir"])                   # " sir" was refused
    with pytest.raises(ValueError, match="cannot appear"):
        eng._check_stop_strings(["</s>"])                                  # a special token: skipped in the text


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_streams_outputs_by_output_kind(embedded, async_scheduling):
    """vLLM's RequestOutputKind: step() returns a running request's output in every step that gives
    it a token (CUMULATIVE: the completion so far; DELTA: only what is new), or only once it
    finishes (FINAL_ONLY, as before; LLM.generate asks for it). Text that may still be cut (the
    start of a stop string) is held back, so every streamed text is a prefix of the final one and
    the deltas add up to it."""
    from llmops_lab.engine import RequestOutputKind as K
    m, tok, _ = embedded
    for stop in (None, ["\n", "the end"]):
        sp = dict(max_tokens=30, stop=stop, **GREEDY)
        ref = LLM(model=m, tokenizer=tok, num_kv_blocks=256).generate(
            "Hello world", SamplingParams(**sp), use_tqdm=False)[0].outputs[0]
        for kind in K:
            eng = LLMEngine(m, tok, EngineConfig(num_kv_blocks=256, async_scheduling=async_scheduling))
            eng.add_request("a", "Hello world", SamplingParams(output_kind=kind, **sp))
            got = []
            while eng.has_unfinished_requests():
                got += eng.step()
            assert [o.finished for o in got] == [False] * (len(got) - 1) + [True], (stop, kind)
            outs = [o.outputs[0] for o in got]
            last = outs[-1]
            assert (last.finish_reason, last.stop_reason) == (ref.finish_reason, ref.stop_reason)
            if kind is K.FINAL_ONLY:
                assert len(got) == 1 and (last.text, last.token_ids) == (ref.text, ref.token_ids)
            elif kind is K.CUMULATIVE:
                assert len(got) == len(ref.token_ids)              # one output per token
                assert [len(o.token_ids) for o in outs] == list(range(1, len(ref.token_ids) + 1))
                assert all(ref.token_ids[:len(o.token_ids)] == o.token_ids for o in outs)
                assert all(ref.text.startswith(o.text) for o in outs), [o.text for o in outs]
                assert (last.text, last.token_ids) == (ref.text, ref.token_ids)
            else:
                assert all(len(o.token_ids) == 1 for o in outs)
                assert "".join(o.text for o in outs) == ref.text
                assert sum((o.token_ids for o in outs), []) == ref.token_ids
            assert eng.get_output("a").outputs[0].text == ref.text      # whole, whatever the kind
        if stop:
            assert ref.finish_reason == "stop"                    # the hold-back was exercised


def test_streamed_text_holds_back_what_may_still_change():
    from llmops_lab.engine.sampling_params import streamed_text
    assert streamed_text("abc\ufffd", SamplingParams()) == "abc"          # half a character
    assert streamed_text("abcdef", SamplingParams(stop=["xyz", "q"])) == "abcd"   # may start "xyz"
    assert streamed_text("abcdef", SamplingParams(stop="xyz", include_stop_str_in_output=True)) == "abcdef"
    assert streamed_text("a", SamplingParams(stop="xyz")) == ""
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(embedded, async_scheduling):
    """Before min_tokens the end-of-sequence id and stop_token_ids cannot be sampled (vLLM masks
    their logits); they were sampled, kept in the output and generation went on past them."""
    m, tok, pad_early = embedded
    llm = LLM(model=pad_early, tokenizer=tok, num_kv_blocks=256, async_scheduling=async_scheduling)
    free = llm.generate("Hello world", SamplingParams(max_tokens=10, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert 2 in free.token_ids[:5]                       # the model does emit <pad> early
    o = llm.generate("Hello world", SamplingParams(max_tokens=10, min_tokens=6, stop_token_ids=[2], **GREEDY),
                     use_tqdm=False)[0].outputs[0]
    assert 2 not in o.token_ids[:6] and len(o.token_ids) >= 7


def test_a_failing_sample_fails_its_request_alone(embedded):
    """A temperature under 1e-5 samples greedily (vLLM's epsilon; 1e-40 overflowed logits / T to
    inf and every later step raised). Any error while sampling ends that request with the error;
    the engine serves the next request."""
    m, tok, _ = embedded
    llm = LLM(model=m, tokenizer=tok, num_kv_blocks=256)
    greedy = llm.generate("Hello world", SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0].outputs[0]
    tiny_t = llm.generate("Hello world", SamplingParams(max_tokens=6, temperature=1e-40), use_tqdm=False)[0]
    assert tiny_t.outputs[0].token_ids == greedy.token_ids
    import llmops_lab.engine.llm_engine as le
    real = le.sample_token

    def broken(logits, params, generator):
        raise RuntimeError("probability tensor contains inf")
    le.sample_token = broken
    try:
        outs = llm.generate(["Hello world", "ROMEO:"], [SamplingParams(max_tokens=4, temperature=0.8, seed=1),
                                                          SamplingParams(max_tokens=4, **GREEDY)], use_tqdm=False)
    finally:
        le.sample_token = real
    assert outs[0].error and "sampling failed" in outs[0].error and outs[0].outputs[0].finish_reason == "error"
    assert len(outs[1].outputs[0].token_ids) == 4 and not outs[1].error
    again = llm.generate("Hello world", SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert again.token_ids == greedy.token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_kv_blocks


def test_llm_input_checks_leave_nothing_queued(tiny):
    """A bool tensor is not token ids (it ran as [1, 0, 1] on the next call after a raw embedding
    error); a wrong SamplingParams anywhere in the list is refused before any prompt is queued (the
    earlier ones stayed queued and ran in the next call); a huge seed works (it overflowed the
    generator's seed); auto ids skip ids the caller took; dtype and device of an already loaded
    model are refused, not ignored."""
    llm = LLM(model=tiny, max_num_seqs=4, num_kv_blocks=32, block_size=8)
    out = llm.generate(torch.tensor([True, False, True]), SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert out.error and "integer" in out.error
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate([[5, 6], [7, 8]], [SamplingParams(), "x"], use_tqdm=False)
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    big = llm.generate([5, 6], SamplingParams(max_tokens=3, temperature=0.8, seed=2**70), use_tqdm=False)[0]
    again = llm.generate([5, 6], SamplingParams(max_tokens=3, temperature=0.8, seed=2**70), use_tqdm=False)[0]
    assert not big.error and big.outputs[0].token_ids == again.outputs[0].token_ids
    eng = LLMEngine(tiny, config=EngineConfig(block_size=8, num_kv_blocks=32))
    eng.add_request("1", [5, 6], SamplingParams(max_tokens=1))
    assert [eng.add_request(None, [5, 6], SamplingParams(max_tokens=1)) for _ in range(2)] == ["0", "2"]
    for kw in (dict(dtype="bfloat16"), dict(device="cpu")):
        with pytest.raises(ValueError, match="loaded"):
            LLM(model=tiny, **kw)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model="target", dtype="fp16")


def test_without_chunked_prefill_the_budget_must_hold_a_whole_sequence(tiny):
    """A sequence preempted late is recomputed in one step, prompt and output together: with
    chunked prefill off and a budget under the context, it could never be admitted again and the
    engine spun forever. Refused up front, as vLLM refuses it."""
    with pytest.raises(ValueError, match="chunked prefill"):
        LLMEngine(tiny, config=EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=16))
    eng = LLMEngine(tiny, config=EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=16,
                                              max_model_len=16, num_kv_blocks=6, block_size=4))
    ps = [[5 + i] * 6 for i in range(2)]
    outs = run_all(eng, [(str(i), p, SamplingParams(max_tokens=9, **GREEDY)) for i, p in enumerate(ps)])
    assert [outs[str(i)].outputs[0].token_ids for i in range(2)] == [alone(tiny, p, 9) for p in ps]
    assert sum(o.outputs[0].num_preemptions for o in outs.values()) > 0     # recomputed whole, 13+ tokens


def test_llm_prompt_forms_and_bad_prompts(tiny):
    """vLLM's prompt forms all reach the engine as the same ids; a prompt that is not token ids is
    refused alone (never truncated: int(5.7) would be another prompt), the others run."""
    llm = LLM(model=tiny, max_num_seqs=4, num_kv_blocks=32, block_size=8)
    p = [5, 6, 7]
    greedy = SamplingParams(max_tokens=3, **GREEDY)
    want = alone(tiny, p, 3)
    forms = [p, tuple(p), torch.tensor(p), {"prompt_token_ids": p}]
    for form in forms:
        assert llm.generate(form, greedy, use_tqdm=False)[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in llm.generate(torch.tensor([p, p]), greedy, use_tqdm=False)] == [want, want]
    bad = [None, [5.7, 6], torch.tensor([5.0, 6.0]), {"text": "x"}, {"prompt": "x", "prompt_token_ids": p}, [5, True],
           {"prompt_token_ids": p, "multi_modal_data": {"image": None}}]      # ran as a plain prompt
    with pytest.warns(UserWarning, match="refused"):
        outs = llm.generate(bad + [p], greedy, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "error" and o.error for o in outs[:-1])
    assert "integers" in outs[1].error and "1-D integer" in outs[2].error and "exactly one" in outs[3].error
    assert "['multi_modal_data'] are not supported" in outs[6].error
    assert outs[-1].outputs[0].token_ids == want
    assert llm.engine.block_manager.num_free_blocks == 32
    with pytest.raises(ValueError, match="1 SamplingParams for 0|0 SamplingParams for 1"):
        llm.generate([p], [], use_tqdm=False)            # [] was read as "none given": the defaults ran
    for bad in (torch.tensor(5), torch.zeros(1, 1, 3, dtype=torch.long), 5):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(bad, greedy, use_tqdm=False)


def test_arrival_time_and_unknown_ids(tiny):
    """A NaN or future arrival time made every latency of the request NaN or negative; an unknown
    id was a bare KeyError."""
    import time
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=16, max_num_seqs=2))
    for t in (float("nan"), time.perf_counter() + 100, "now", True):
        with pytest.raises(ValueError, match="arrival_time"):
            eng.add_request("a", [5, 6], SamplingParams(max_tokens=2, **GREEDY), arrival_time=t)
    assert not eng.requests
    eng.add_request("a", [5, 6], SamplingParams(max_tokens=2, **GREEDY), arrival_time=time.perf_counter() - 1)
    outs = run_all(eng, [])
    assert outs["a"].metrics.first_token_time - outs["a"].metrics.arrival_time >= 1
    for call in (eng.get_output, eng.release, eng.abort):
        with pytest.raises(KeyError, match="no request 'nope'"):
            call("nope")


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=3), "block_size must be a power of two"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization must be a finite number"),
    (dict(block_size=16.0), "block_size must be an integer, got 16.0"),
    (dict(max_num_seqs=2.5), "max_num_seqs must be an integer"),
    (dict(max_num_seqs=True), "max_num_seqs must be an integer, got True"),
    (dict(num_kv_blocks=8.0), "num_kv_blocks must be an integer or None"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(async_scheduling="no"), "async_scheduling must be True or False, got 'no'"),
    (dict(enforce_eager=1), "enforce_eager must be True or False"),
    (dict(cpu_kv_cache_space_gib=-1), "cpu_kv_cache_space_gib must be > 0"),
])
def test_bad_engine_config(kw, match):
    """vLLM's knobs as LLM(...) takes them: a wrong type or value is a clear error, never a flag
    read as truthy or a float that fails deep inside."""
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)
    import numpy as np
    assert EngineConfig(max_num_seqs=np.int64(4), gpu_memory_utilization=np.float32(0.5)).max_num_seqs == 4


def test_scheduler_is_plain_python():
    """Bookkeeping alone: admission stops at max_num_seqs and the token budget."""
    bm = BlockManager(100, 4, track_computed=True)
    sch = Scheduler(EngineConfig(max_num_seqs=2, max_num_batched_tokens=10, block_size=4), bm)
    for n in (6, 6, 6):
        sch.add(Sequence(list(range(2, 2 + n)), sampling_params=SamplingParams()))
    batch = sch.schedule()
    assert batch.num_tokens == [6, 4] and len(sch.running) == 2 and len(sch.waiting) == 1


@pytest.mark.parametrize("static_cache", [False, True])     # True: the GPU's path, run eagerly
def test_static_baseline_matches_alone(tiny, static_cache):
    ps = prompts(4, 2, 30, seed=9)
    outs, steps = run_static_batch(tiny, ps, [SamplingParams(max_tokens=n, **GREEDY) for n in (3, 9, 1, 5)],
                                   static_cache=static_cache)
    for o, p, n in zip(outs, ps, (3, 9, 1, 5)):
        assert o.outputs[0].token_ids == alone(tiny, p, n)
    assert len(steps) == 9 and steps[-1]["num_active"] == 1     # runs until the longest is done


def test_workload_runs_agree(tiny):
    toks = [t % 300 + 2 for t in range(5000)]
    wl = make_workload(toks, 10, prompt_len=(2, 20), mean_output=6, spread=1.0, max_output=30, arrival_rate=500)
    c = run_continuous(tiny, wl, EngineConfig(max_num_seqs=4, block_size=8), progress=False)
    s = run_static(tiny, wl, 4, progress=False)
    assert c.outputs == s.outputs and len(c.requests) == 10
    assert c.throughput > 0 and all(r["ttft"] is not None for r in c.requests)


def test_llm_interface_embedded():
    """The documents' vLLM snippet with its import changed (and the embedded model)."""
    llm = LLM(model="target", gpu_memory_utilization=0.9, max_num_batched_tokens=8192, max_num_seqs=256,
              block_size=16)
    outs = llm.generate(["Explain quantum computing", "What is machine learning?", ""],
                        SamplingParams(temperature=0.7, max_tokens=8), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs[:2]] == [8, 8] or all(
        o.outputs[0].finish_reason == "stop" for o in outs[:2] if len(o.outputs[0].token_ids) < 8)
    assert isinstance(outs[0].outputs[0].text, str)
    assert outs[2].error and "empty" in outs[2].error
    stop = llm.generate("The king", SamplingParams(temperature=0, max_tokens=40, stop=["\n"]), use_tqdm=False)[0]
    assert "\n" not in stop.outputs[0].text
    with pytest.raises(ValueError, match="one device"):                 # vLLM's argument, one GPU here
        LLM(model="target", tensor_parallel_size=2)
    with pytest.raises(TypeError, match="unknown arguments"):
        LLM(model="target", pipeline_parallel_size=2)
    assert LLM(model="target", tensor_parallel_size=1, trust_remote_code=True).engine is not None
    assert outs[0].prompt_logprobs is None and outs[0].outputs[0].cumulative_logprob is None


def test_step_time_fit_and_formulas(tiny):
    from llmops_lab.engine import experiment
    rows = experiment.decode_step_times(tiny, batch_sizes=(1, 2, 4), contexts=(8, 24), repeats=1)
    assert len(rows) == 6 and all(r["step_s"] > 0 for r in rows)
    fn, (a, b, c) = experiment.fit_step_time(rows)
    assert min(a, b, c) >= 0 and fn(2, 8) > 0
    exact = [{"batch": B, "context": x, "step_s": 1e-3 + 2e-4 * B + 1e-6 * B * x} for B in (1, 4) for x in (8, 64)]
    assert experiment.fit_step_time(exact)[1] == pytest.approx((1e-3, 2e-4, 1e-6), rel=1e-6)
    toks = [t % 300 + 2 for t in range(3000)]
    wl = make_workload(toks, 8, prompt_len=(2, 10), mean_output=5, spread=1.0, max_output=20)
    res = experiment.compare(tiny, wl, max_num_seqs=4, block_size=8, bracket=True, rounds=2)
    assert [len(res[k]) for k in ("continuous_runs", "static_runs")] == [3, 2]      # C S C S C
    assert res["continuous"] is res["continuous_runs"][-1] and res["static"] is res["static_runs"][-1]
    assert experiment.same_outputs(res)
    for kind, pool in (("continuous", experiment.continuous_throughput), ("static", experiment.static_throughput)):
        runs = res[f"{kind}_runs"]          # tokens of every run over their summed makespans
        assert pool(res) == pytest.approx(sum(r.output_tokens for r in runs) / sum(r.makespan for r in runs))
        assert min(r.throughput for r in runs) <= pool(res) <= max(r.throughput for r in runs)
        assert pool({kind: runs[0]}) == runs[0].throughput
    with pytest.raises(ValueError, match="rounds"):
        experiment.compare(tiny, wl, bracket=True, rounds=0)
    # step_breakdown: the engine's decode-only and mixed steps; a static run's decode steps and prefills
    for kind, prefills in (("continuous", None), ("static", 2)):       # 8 requests in batches of 4
        b = experiment.step_breakdown(res[kind])
        assert b["decode_steps"] + b["mixed_steps"] == len(res[kind].steps) and b["decode_steps"] > 0
        assert prefills is None or b["mixed_steps"] == prefills
    # padded generate runs the batches static batching runs, each for its longest output: the prefill
    # step gives each request's first token, so the two count the same steps
    assert [[r.request_id for r in b] for b in experiment.padded_batches(wl, 4)] == \
        [[r.request_id for r in sorted(wl, key=lambda r: r.arrival)][i:i + 4] for i in (0, 4)]
    assert experiment.padded_generate_steps(wl, 4) == len(res["static"].steps)
    assert experiment.padded_generate_steps(wl, 8) == max(r.params.max_tokens for r in wl)
    with pytest.raises(ValueError, match="batch_size"):
        experiment.padded_generate_steps(wl, 0)
    for kind in ("static", "continuous"):
        p = experiment.predict(res[kind], fn, kind, 4)
        assert p["throughput_tok_s"] > 0
    rows = experiment.sweep(tiny, toks, "spread", [0.0, 1.0], n=6, max_num_seqs=3,
                            base=dict(prompt_len=(2, 8), mean_output=4, max_output=12),
                            step_time={"static": fn, "continuous": fn}, progress=False)
    assert all(r["predicted_tok_s"] > 0 for r in rows)
    assert len(experiment.static_step_times(tiny, (1, 2), (8,), repeats=1)) == 2
    assert len(rows) == 4 and all(r["same_outputs"] for r in rows if r["kind"] == "continuous")
    with pytest.raises(ValueError, match="param"):
        experiment.sweep(tiny, toks, "colour", [1])


def test_engine_with_triton_kernels_matches(tiny):
    """The GPU path (Triton paged decode and prefill kernels inside the packed step), run by Triton's
    interpreter on a CPU: same greedy tokens as the model alone."""
    from llmops_lab.paged import triton_paged
    if not triton_paged.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (scripts/test sets it without a GPU)")
    eng = LLMEngine(tiny, config=EngineConfig(block_size=8, max_num_seqs=4, max_num_batched_tokens=24))
    eng.runner.use_kernels = True
    ps = prompts(4, 3, 30, seed=11)
    ps[2] = ps[0][:16] + [7, 8, 9]               # a prefix-cache hit: prefill starts mid-sequence
    outs = run_all(eng, [(str(i), p, SamplingParams(max_tokens=4, **GREEDY)) for i, p in enumerate(ps)], add_every=2)
    for i, p in enumerate(ps):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, 4), f"request {i}"


def test_agreement_counts_first_tokens_and_common_prefixes():
    from llmops_lab.engine.experiment import agreement
    from llmops_lab.engine.workload import RunResult
    a, b = RunResult("a"), RunResult("b")
    a.outputs = {"0": [1, 2, 3, 4], "1": [5, 6], "2": [7]}
    b.outputs = {"0": [1, 2, 9, 9], "1": [8, 6], "2": [7]}
    got = agreement(a, b)
    assert got["first_token"] == 2 / 3 and abs(got["prefix"] - (0.5 + 0 + 1) / 3) < 1e-12
    with pytest.raises(ValueError, match="share no request"):
        agreement(a, RunResult("c"))
    empty_a, empty_b = RunResult("a"), RunResult("b")                  # was {first_token: 0, prefix: 0}
    empty_a.outputs = empty_b.outputs = {"0": []}
    with pytest.raises(ValueError, match="no output tokens"):
        agreement(empty_a, empty_b)
    from llmops_lab.engine.experiment import same_outputs
    for runs in ({}, {"only": a}):                                     # {} was True: nothing compared
        with pytest.raises(ValueError, match="two runs or more"):
            same_outputs(runs)


def static_decode_engine(model, use_kernels: bool, prefill_graphs: int | None = None, **cfg):
    """An engine whose decode steps take the CUDA-graph path's static buffers, run eagerly (no
    capture on a CPU); counts how many steps went that way. ``prefill_graphs``: new whole prompts
    (up to that many tokens a step) through the prefill graphs' buffers as well."""
    from llmops_lab.engine.model_runner import ModelRunner
    eng = LLMEngine(model, config=EngineConfig(**cfg))
    c = eng.config
    eng.runner = ModelRunner(model, eng.num_kv_blocks, c.block_size, decode_graphs="static",
                             max_num_seqs=c.max_num_seqs, max_model_len=eng.max_model_len,
                             prefill_graphs=prefill_graphs, fused_ops=c.fused_ops)
    eng.runner.graphs.use_kernels = use_kernels
    eng.static_steps = 0
    run = eng.runner.graphs.run

    def counted(*a, **kw):
        eng.static_steps += 1
        return run(*a, **kw)
    eng.runner.graphs.run = counted
    return eng


def test_batch_buckets():
    from llmops_lab.engine.cuda_graph import batch_buckets
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("cfg", [
    dict(max_num_seqs=5, max_num_batched_tokens=64),                     # buckets 1, 2, 4, 5: padding rows
    dict(max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=12),  # preemption, recompute
])
def test_static_decode_path_equals_alone(tiny, use_kernels, cfg):
    """The CUDA-graph path's static buffers (padded to a bucket, scratch block, context bound from
    max_model_len), run eagerly: the same greedy tokens as each prompt alone, every block back."""
    from llmops_lab.paged import triton_paged
    if use_kernels and not triton_paged.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (scripts/test sets it without a GPU)")
    ps = prompts(9, seed=4)
    ps[4] = ps[2][:17] + ps[4]                      # a prefix-cache hit
    lens = [1 + (i * 5) % 13 for i in range(len(ps))]
    eng = static_decode_engine(tiny, use_kernels, block_size=8, **cfg)
    reqs = [(str(i), p, SamplingParams(max_tokens=n, **GREEDY)) for i, (p, n) in enumerate(zip(ps, lens))]
    outs = run_all(eng, reqs, shuffle_seed=1, add_every=3)
    for i, (p, n) in enumerate(zip(ps, lens)):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, n), f"request {i}"
    assert eng.static_steps > 5
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    if cfg.get("num_kv_blocks") == 12:
        assert eng.scheduler.num_preemptions > 0


def test_static_decode_path_samples_like_the_eager_one(tiny):
    """Seeded sampling and n > 1 (copy-on-write of a shared block) through the static path: the
    same tokens as the eager engine."""
    ps = prompts(4, 5, 30, seed=8)
    params = SamplingParams(max_tokens=9, temperature=0.9, top_p=0.9, n=2, seed=5, ignore_eos=True)
    reqs = [(str(i), p, params) for i, p in enumerate(ps)]
    eager = run_all(LLMEngine(tiny, config=EngineConfig(block_size=8, max_num_seqs=8)), reqs)
    eng = static_decode_engine(tiny, False, block_size=8, max_num_seqs=8)
    static = run_all(eng, reqs)
    assert eng.static_steps > 0
    for i in range(len(ps)):
        assert [c.token_ids for c in static[str(i)].outputs] == [c.token_ids for c in eager[str(i)].outputs]


def test_token_buckets():
    from llmops_lab.engine.cuda_graph import token_buckets
    assert token_buckets(16) == [16]
    assert token_buckets(40) == [16, 32, 40]
    assert token_buckets(512) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("cfg", [
    dict(max_num_seqs=5, max_num_batched_tokens=64),                     # mixed steps of prompts + decodes
    dict(max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=12),  # preemption, recompute
])
def test_prefill_graph_path_equals_alone(tiny, use_kernels, cfg):
    """Steps whose prompts are new and whole run them through the prefill graphs' static buffers
    (packed, padded to a token bucket, each prompt causal on itself) and their decodes through the
    decode graphs' (both run eagerly on a CPU): the same greedy tokens as each prompt alone; a
    prefix-cache hit, a chunked prompt or too many tokens leave the step to the eager path."""
    from llmops_lab.paged import triton_paged
    if use_kernels and not triton_paged.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (scripts/test sets it without a GPU)")
    ps = prompts(9, seed=4)
    ps[4] = ps[2][:17] + ps[4]                      # a prefix-cache hit
    if "num_kv_blocks" not in cfg:
        ps[7] = ps[7] * 3                           # chunked: past the 64-token budget of a step
    lens = [1 + (i * 5) % 13 for i in range(len(ps))]
    eng = static_decode_engine(tiny, use_kernels, prefill_graphs=48, block_size=8, **cfg)
    reqs = [(str(i), p, SamplingParams(max_tokens=n, **GREEDY)) for i, (p, n) in enumerate(zip(ps, lens))]
    outs = run_all(eng, reqs, shuffle_seed=1, add_every=3)
    for i, (p, n) in enumerate(zip(ps, lens)):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, n), f"request {i}"
    steps = len(eng.step_stats)
    assert 0 < eng.runner.prefill_graph_steps < steps and eng.static_steps > eng.runner.prefill_graph_steps
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    if cfg.get("num_kv_blocks") == 12:
        assert eng.scheduler.num_preemptions > 0


def test_prefill_graph_path_samples_like_the_eager_one(tiny):
    """Seeded sampling with n > 1 (the prompt's blocks shared, copy-on-write) through both graphs'
    buffers: the same tokens as the eager engine; and the runner refuses prefill graphs without the
    decode graphs they run beside."""
    from llmops_lab.engine.model_runner import ModelRunner
    ps = prompts(5, 5, 30, seed=9)
    params = SamplingParams(max_tokens=7, temperature=0.8, top_k=20, n=2, seed=3, ignore_eos=True)
    reqs = [(str(i), p, params) for i, p in enumerate(ps)]
    eager = run_all(LLMEngine(tiny, config=EngineConfig(block_size=8, max_num_seqs=8)), reqs, add_every=2)
    eng = static_decode_engine(tiny, False, prefill_graphs=64, block_size=8, max_num_seqs=8)
    graphed = run_all(eng, reqs, add_every=2)
    assert eng.runner.prefill_graph_steps > 0
    for i in range(len(ps)):
        assert [c.token_ids for c in graphed[str(i)].outputs] == [c.token_ids for c in eager[str(i)].outputs]
    with pytest.raises(ValueError, match="decode graphs"):
        ModelRunner(tiny, 8, 8, prefill_graphs=32)


def _stop_ids(model, ps, lens):
    """Three tokens the prompts' greedy continuations often produce: as stop tokens they end about
    half the requests early, at steps the host cannot know in advance."""
    from collections import Counter
    seen = Counter(t for p, n in zip(ps, lens) for t in alone(model, p, n)[1:])
    return tuple(t for t, _ in seen.most_common(3))


@pytest.mark.parametrize("runner", ["eager", "graph buffers"])
@pytest.mark.parametrize("cfg", [
    dict(max_num_seqs=16, max_num_batched_tokens=512),                    # whole prompts, big batches
    dict(max_num_seqs=3, max_num_batched_tokens=7),                       # tiny chunks, few seats
    # the pool runs dry: preemption (without stop tokens, which end requests too early for it)
    dict(max_num_seqs=16, max_num_batched_tokens=64, num_kv_blocks=12),
    dict(max_num_seqs=8, max_num_batched_tokens=33, block_size=1),        # every token fills a block
])
def test_async_scheduling_equals_lockstep(tiny, runner, cfg):
    """Async scheduling (each step launched before the previous step's tokens are read, placeholders
    fed from the device) gives every request the tokens and finish reason of the lockstep engine,
    with stop tokens ending requests at unforeseen steps, preemption, chunks and prefix-cache hits;
    every block comes back. On the graph buffers (the GPU's path, run eagerly) the fed rows go through
    ``DecodeGraphs.run``, else through the eager packed forward."""
    cfg = {"block_size": 8, **cfg}
    ps = prompts(12, seed=1)
    ps[5] = ps[3][:17] + ps[5]
    ps[7] = list(ps[3])
    lens = [1 + (i * 7) % 23 for i in range(len(ps))]
    preempt = cfg.get("num_kv_blocks") == 12
    stops = () if preempt else _stop_ids(tiny, ps, lens)
    reqs = [(str(i), p, SamplingParams(max_tokens=n, temperature=0.0, stop_token_ids=stops, ignore_eos=preempt))
            for i, (p, n) in enumerate(zip(ps, lens))]
    runs = {}
    for mode in ("lockstep", "async"):
        c = dict(cfg, async_scheduling=mode == "async")
        eng = static_decode_engine(tiny, False, **c) if runner == "graph buffers" else LLMEngine(tiny, config=EngineConfig(**c))
        outs = run_all(eng, reqs, shuffle_seed=3, add_every=2)
        runs[mode] = eng, {k: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for k, o in outs.items()}
        assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
        assert all(PENDING not in s.token_ids for r in eng.requests.values() for s in r.seqs)
    (lock, a), (asy, b) = runs["lockstep"], runs["async"]
    assert a == b
    assert asy.overlapped_steps > len(asy.step_stats) // 2 and lock.overlapped_steps == 0
    assert asy.block_manager.prefix_hits > 0
    if preempt:
        assert asy.scheduler.num_preemptions > 0
    else:
        assert sum(r == "stop" for _, r in a.values()) >= 3
    if runner == "graph buffers":
        assert asy.static_steps > 0
    # the step rows tile the timeline, each ending when its tokens were read
    for r0, r1 in zip(asy.step_stats, asy.step_stats[1:]):
        assert r0["t_start"] <= r0["t_end"] <= r1["t_start"] + 1e-9 or r1["t_start"] == r0["t_end"]


def test_async_scheduling_skips_what_it_cannot_overlap(tiny):
    """A sampled request with n = 2 needs its logits on the host: while it is in the engine the
    steps run in lockstep (seeded samples equal the lockstep engine's), and the greedy requests
    around it overlap before and after; a request whose last token is certain (max_tokens) sits
    out the step after it; an abort while a token is on its way keeps only the tokens read."""
    ps = prompts(6, 5, 20, seed=5)
    greedy = SamplingParams(max_tokens=9, **GREEDY)
    sampled = SamplingParams(max_tokens=4, temperature=0.9, n=2, seed=11, ignore_eos=True)
    reqs = [(str(i), p, sampled if i == 3 else greedy) for i, p in enumerate(ps)]
    outs = {}
    for mode in (False, True):
        eng = LLMEngine(tiny, config=EngineConfig(block_size=4, max_num_seqs=4, async_scheduling=mode))
        outs[mode] = {k: [c.token_ids for c in o.outputs] for k, o in run_all(eng, reqs, add_every=1).items()}
    assert outs[False] == outs[True] and 0 < eng.overlapped_steps < len(eng.step_stats)
    # one request of 3 tokens: prefill and two decodes, no step past its end
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, async_scheduling=True))
    out = run_all(eng, [("a", ps[0], SamplingParams(max_tokens=3, **GREEDY))])["a"]
    assert out.outputs[0].token_ids == alone(tiny, ps[0], 3) and len(eng.step_stats) == 3
    # a follow-up whose prompt is the first prompt and its answer finds the answer's full blocks in
    # the prefix cache: blocks completed by a placeholder were registered when its value arrived
    p = prompts(1, 8, 8, seed=6)[0]
    for mode in (False, True):
        eng = LLMEngine(tiny, config=EngineConfig(block_size=4, async_scheduling=mode))
        first = run_all(eng, [("a", p, SamplingParams(max_tokens=13, **GREEDY))])["a"].outputs[0].token_ids
        run_all(eng, [("b", p + first + [5], SamplingParams(max_tokens=2, **GREEDY))])
        assert eng.block_manager.prefix_hits == (8 + 13) // 4, mode
    # abort between steps: one token is on the device, the output holds only those read
    eng = LLMEngine(tiny, config=EngineConfig(block_size=4, num_kv_blocks=40, async_scheduling=True))
    for i, p in enumerate(ps[:3]):
        eng.add_request(str(i), p, SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(4):
        eng.step()
    seq = eng.requests["1"].seqs[0]
    assert seq.num_pending == 1 and len(eng.get_output("1").outputs[0].token_ids) == 3
    eng.abort("1")
    out = eng.get_output("1").outputs[0]
    assert out.finish_reason == "abort" and out.token_ids == alone(tiny, ps[1], 3)
    while eng.has_unfinished_requests():
        eng.step()
        eng.check()
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    assert eng.get_output("0").outputs[0].token_ids == alone(tiny, ps[0], 30)


def test_fused_ops_in_graphed_steps_equal_alone(tiny):
    """``EngineConfig(fused_ops=True)``: the graphed steps (decodes, new prompts) run each layer's
    elementwise ops as one Triton kernel each (under the interpreter here), with async scheduling on
    top: the same greedy tokens as each prompt alone; the eager steps (chunks, prefix hits) keep the
    modules. The runner refuses fused ops without graphs to run them in."""
    from llmops_lab.engine.model_runner import ModelRunner
    from llmops_lab.paged import triton_paged
    if not triton_paged.available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (scripts/test sets it without a GPU)")
    ps = prompts(7, seed=12)
    ps[3] = ps[1][:17] + ps[3]                      # a prefix-cache hit: an eager step
    ps[5] = ps[5] * 3                               # chunked past the budget: eager steps
    lens = [1 + (i * 5) % 11 for i in range(len(ps))]
    eng = static_decode_engine(tiny, True, prefill_graphs=48, block_size=8, max_num_seqs=4,
                               max_num_batched_tokens=64, fused_ops=True, async_scheduling=True)
    reqs = [(str(i), p, SamplingParams(max_tokens=n, **GREEDY)) for i, (p, n) in enumerate(zip(ps, lens))]
    outs = run_all(eng, reqs, add_every=2)
    for i, (p, n) in enumerate(zip(ps, lens)):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, n), f"request {i}"
    assert eng.runner.graphs.fused and eng.runner.prefill.fused
    assert eng.static_steps > 5 and eng.runner.prefill_graph_steps > 0 and eng.overlapped_steps > 0
    with pytest.raises(ValueError, match="graphed steps"):
        ModelRunner(tiny, 8, 8, fused_ops=True)


def test_decode_graphs_refuse_what_they_cannot_hold(tiny):
    from llmops_lab.engine.cuda_graph import DecodeGraphs
    from llmops_lab.engine.model_runner import ModelRunner, decode_graphs_possible
    assert not decode_graphs_possible(tiny)          # a CPU: the engine runs eagerly
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(tiny, [], [], 8, 4, 64, scratch_block=0)
    with pytest.raises(ValueError, match="decode_graphs"):
        ModelRunner(tiny, 4, 8, decode_graphs="always")
    from dataclasses import replace
    windowed = type(tiny)(replace(TINY, sliding_window=16))
    with pytest.raises(ValueError, match="sliding window"):
        ModelRunner(windowed, 4, 8, decode_graphs="static")


def gpu_model_and_requests():
    """The GPU tests' fp32 model (wider than ``tiny``, a 512-token context) and greedy requests."""
    from llmops_lab.model import LlamaModel
    cfg = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaModel(cfg).eval().cuda()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.08)
    return model, [(str(i), p, SamplingParams(max_tokens=3 + i % 9, **GREEDY)) for i, p in enumerate(prompts(11, seed=2))]


@pytest.mark.gpu
def test_captured_decode_graphs_match_eager():
    """On a GPU: the engine with CUDA graphs (the default), with prefill graphs and with async
    scheduling (graphed and eager) gives the eager engine's greedy tokens (fp32, so batching cannot
    round differently)."""
    model, reqs = gpu_model_and_requests()
    outs = {}
    modes = ("eager", "decode graphs", "prefill graphs too", "async", "async eager")
    for mode in modes:
        eng = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=6, num_kv_blocks=64,
                                                   enforce_eager=mode in ("eager", "async eager"),
                                                   prefill_graphs=mode in ("prefill graphs too", "async"),
                                                   async_scheduling=mode.startswith("async")))
        assert (eng.runner.graphs is None) == mode.endswith("eager")
        assert (eng.runner.prefill is None) == (mode not in ("prefill graphs too", "async"))
        outs[mode] = {k: v.outputs[0].token_ids for k, v in run_all(eng, reqs, add_every=2).items()}
        if eng.runner.prefill is not None:
            assert eng.runner.prefill_graph_steps > 0 and eng.runner.prefill.graphs
        if mode.startswith("async"):
            assert eng.overlapped_steps > 0
    assert all(outs[m] == outs["eager"] for m in modes)


@pytest.mark.gpu
def test_captured_fused_ops_match_eager():
    """On a GPU: the engine with the fused elementwise kernels in its captured graphs (and prefill
    graphs, async scheduling) gives the eager engine's greedy tokens (fp32; the kernels' exp and
    sqrt are the GPU's own, a rounding apart from PyTorch's: a near-tie could flip, none should)."""
    model, reqs = gpu_model_and_requests()
    outs = {}
    for fused in (False, True):
        eng = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=6, num_kv_blocks=64,
                                                   enforce_eager=not fused, prefill_graphs=fused,
                                                   async_scheduling=fused, fused_ops=fused))
        assert (eng.runner.graphs is not None and eng.runner.graphs.fused) == fused
        outs[fused] = {k: v.outputs[0].token_ids for k, v in run_all(eng, reqs, add_every=2).items()}
    assert outs[True] == outs[False]


@pytest.mark.parametrize("mixed", [False, True])
def test_profile_reports_decode_and_mixed_steps(tiny, mixed):
    """engine.profile runs its steps through the engine and returns the tables it prints; a mixed
    step is batch-1 decodes and one new prompt's prefill."""
    from llmops_lab.engine.profile import profile_decode_steps
    r = profile_decode_steps(tiny, batch_size=3, prompt_len=8, steps=2, row_limit=3, mixed=mixed)
    assert r["mixed"] is mixed and r["graphs"] is False and r["step_ms"] > 0
    assert "aten::" in r["cpu_table"]
    with pytest.raises(ValueError, match="batch_size >= 2"):
        profile_decode_steps(tiny, batch_size=1, mixed=True)


def test_warm_up_runs_both_eager_step_kinds_and_leaves_outputs_alone(tiny):
    """ModelRunner.warm_up (called on CUDA when the engine starts, so Triton compiles before a served
    step) runs a chunked prefill and a mixed step on scratch blocks: here through the kernels under
    Triton's interpreter when it is on, else the references; the engine's greedy tokens afterwards
    are each prompt's alone, and a pool too small for it is left untouched."""
    from llmops_lab.engine.model_runner import ModelRunner
    from llmops_lab.paged import triton_paged
    eng = LLMEngine(tiny, config=EngineConfig(block_size=8, max_num_seqs=4, max_num_batched_tokens=24))
    eng.runner.use_kernels = triton_paged.available(torch.device("cpu"))
    calls = []
    execute = eng.runner.execute
    eng.runner.execute = lambda batch: calls.append([n for n in batch.num_tokens]) or execute(batch)
    assert eng.runner.warm_up()
    assert calls == [[8, 9], [11, 1]]                # a first chunk and a whole prompt; the rest and a decode
    eng.runner.execute = execute
    assert eng.block_manager.num_free_blocks == eng.num_kv_blocks
    ps = prompts(3, 3, 30, seed=5)
    outs = run_all(eng, [(str(i), p, SamplingParams(max_tokens=4, **GREEDY)) for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert outs[str(i)].outputs[0].token_ids == alone(tiny, p, 4), f"request {i}"
    assert ModelRunner(tiny, 3, 8).warm_up() is False                # 3 blocks: too few
    assert ModelRunner(tiny, 400, 128).warm_up() is False            # 259 tokens: past the context of 256


@pytest.mark.gpu
def test_warm_up_compiles_what_served_steps_use(compiled_variants):
    """On a GPU: after the engine's warm-up, serving requests that chunk, hit the prefix cache and
    mix prefills with decodes in every row position compiles no further variant of the paged
    prefill, decode or split-merge kernels (each compile is a second or so inside a served step):
    steps whose block tables are 1 block wide, 16 wide (Triton specialises an integer of 1 and one
    divisible by 16), and a context past 512 tokens decoding beside a prefill (split in two)."""
    from llmops_lab.config import ModelConfig
    from llmops_lab.model import LlamaModel
    from llmops_lab.paged.triton_paged import merge_splits_kernel, paged_decode_kernel
    from llmops_lab.paged.triton_prefill import paged_prefill_kernel
    cfg = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=1)
    model = LlamaModel(cfg).eval().cuda().to(torch.bfloat16)
    eng = LLMEngine(model, config=EngineConfig(block_size=16, max_num_seqs=6, num_kv_blocks=200,
                                               max_num_batched_tokens=40))
    before = {k: compiled_variants(k) for k in (paged_prefill_kernel, paged_decode_kernel, merge_splits_kernel)}
    short = prompts(4, 2, 8, seed=4)                     # every context inside one block
    ps = prompts(14, 2, 70, seed=3)
    ps[5] = ps[1][:32] + [9, 9, 9]                       # a prefix-cache hit
    long = prompts(1, 250, 250, seed=5) + prompts(1, 600, 600, seed=6)
    tail = prompts(6, 30, 60, seed=7)                    # prefilled while the 600-token one decodes
    reqs = ([(f"s{i}", p, SamplingParams(max_tokens=3, **GREEDY)) for i, p in enumerate(short)]
            + [(str(i), p, SamplingParams(max_tokens=2 + i % 7, **GREEDY)) for i, p in enumerate(ps)]
            + [(f"l{i}", p, SamplingParams(max_tokens=40, **GREEDY)) for i, p in enumerate(long)]
            + [(f"t{i}", p, SamplingParams(max_tokens=4, **GREEDY)) for i, p in enumerate(tail)])
    run_all(eng, reqs, add_every=3)
    after = {k: compiled_variants(k) for k in before}
    assert after == before, {k.fn.__name__: (before[k], after[k]) for k in before}


@pytest.fixture(scope="module")
def engine_machine(tiny):
    """Random interleavings of add_request, abort and step (hypothesis' stateful testing) on a pool
    small enough to preempt, with prompts that share prefixes (prefix-cache hits) and n = 2
    (copy-on-write). After every operation the block manager's invariants hold; at the end every
    request is accounted for, every block is free, and each request that was not aborted produced
    exactly what its prompt produces alone (up to its stop token, when it has one), streamed as its
    output kind asks: cumulative outputs only ever grow, deltas add up to the whole. (Without the
    copy half of copy-on-write it fails at once; about 3 preemptions and 1.4 aborts per example.)"""
    from llmops_lab.engine import RequestOutputKind as K
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    base = prompts(3, 12, 20, seed=21)
    cache = {}

    def expected(p, n, stops=()):
        key = (tuple(p), n)
        if key not in cache:
            cache[key] = alone(tiny, p, n)
        out = cache[key]
        cut = next((i for i, t in enumerate(out) if t in stops), None)   # a stop token ends it, kept
        return out if cut is None else out[:cut + 1]

    # a token the base prompts' continuations produce: as a stop token it ends some requests early
    STOP = _stop_ids(tiny, base, [14] * len(base))[:1]

    class Machine(RuleBasedStateMachine):
        graphs = False          # True: decodes and new prompts through the CUDA graphs' static buffers
        overlap = False         # True: async scheduling (greedy n = 1 steps launched before reads)

        def __init__(self):
            super().__init__()
            cfg = dict(block_size=4, num_kv_blocks=10, max_num_seqs=4, max_num_batched_tokens=16,
                       async_scheduling=self.overlap)
            self.eng = (static_decode_engine(tiny, False, prefill_graphs=16, **cfg) if self.graphs
                        else LLMEngine(tiny, config=EngineConfig(**cfg)))
            self.reqs, self.aborted, self.outs, self.ids = {}, set(), {}, 0
            self.streamed = {}          # request id: each sample's tokens, as its outputs gave them

        def collect(self, out):
            kind, got = self.reqs[out.request_id][4], self.streamed.setdefault(out.request_id, {})
            for c in out.outputs:
                if kind is K.DELTA:
                    got[c.index] = got.get(c.index, []) + c.token_ids
                else:
                    assert c.token_ids[:len(got.get(c.index, []))] == got.get(c.index, []), out.request_id
                    got[c.index] = c.token_ids
            assert kind is not K.FINAL_ONLY or out.finished
            if out.finished:
                self.outs[out.request_id] = out

        @rule(which=st.integers(0, 2), cut=st.integers(1, 12), tail=st.lists(st.integers(2, 300), max_size=6),
              two=st.integers(0, 8), max_tokens=st.integers(1, 14), stops=st.sampled_from([(), STOP]),
              kind=st.sampled_from(list(K)))
        def add(self, which, cut, tail, two, max_tokens, stops, kind):
            # n = 2 for a third of the requests; for a ninth with async scheduling, where any n > 1
            # request in the engine puts the steps back in lockstep
            n = 2 if two < (1 if self.overlap else 3) else 1
            p = base[which][:cut] + tail
            rid = f"r{self.ids}"
            self.ids += 1
            self.eng.add_request(rid, p, SamplingParams(n=n, max_tokens=max_tokens, stop_token_ids=stops,
                                                        output_kind=kind, **GREEDY))
            self.reqs[rid] = (p, n, max_tokens, stops, kind)

        @rule(pick=st.integers(0, 1000))
        def abort(self, pick):
            live = [r for r in self.reqs if r not in self.outs and r not in self.aborted]
            if live:
                rid = live[pick % len(live)]
                self.eng.abort(rid)
                self.aborted.add(rid)

        @rule(times=st.integers(1, 4))
        def step(self, times):
            for _ in range(times):
                if not self.eng.has_unfinished_requests():
                    break
                for out in self.eng.step():
                    self.collect(out)

        @invariant()
        def blocks_consistent(self):
            self.eng.check()
            assert 0 <= self.eng.block_manager.num_free_blocks <= self.eng.num_kv_blocks

        def teardown(self):
            while self.eng.has_unfinished_requests():
                for out in self.eng.step():
                    self.collect(out)
            assert self.eng.block_manager.num_free_blocks == self.eng.num_kv_blocks
            for rid, (p, n, max_tokens, stops, kind) in self.reqs.items():
                out = self.outs.get(rid) or self.eng.get_output(rid)
                assert out.finished, rid
                if rid in self.aborted and rid not in self.outs:
                    continue
                if out.error:          # refused while running: only a request the pool cannot hold
                    assert "too small" in out.error, out.error
                    continue
                want = [expected(p, max_tokens, stops)] * n
                if kind is not K.DELTA:          # a delta output holds only the last tokens
                    assert [c.token_ids for c in out.outputs] == want, rid
                assert [self.streamed[rid][i] for i in range(n)] == want, rid

    Machine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
    return Machine


@pytest.mark.parametrize("graphs, overlap", [(False, False), (True, False), (True, True)])
def test_engine_random_interleavings(engine_machine, graphs, overlap):
    from hypothesis.stateful import run_state_machine_as_test
    engine_machine.graphs, engine_machine.overlap = graphs, overlap
    run_state_machine_as_test(engine_machine, settings=engine_machine.TestCase.settings)


WORKLOAD_TOKENS = [t % 300 + 2 for t in range(500)]


@pytest.mark.parametrize("kw, match", [
    (dict(arrival_rate=float("nan")), "arrival_rate must be > 0"),
    (dict(arrival_rate=0), "arrival_rate must be > 0"),
    (dict(arrival_rate=-float("inf")), "arrival_rate must be > 0"),
    (dict(mean_output=0), "mean_output must be .* > 0, got 0"),
    (dict(mean_output=float("inf")), "mean_output must be a finite"),
    (dict(mean_output=float("nan")), "mean_output must be a finite"),
    (dict(spread=float("nan")), "spread must be a finite"),
    (dict(spread=-0.5), "spread must be .* >= 0"),
    (dict(max_output=0), "max_output must be an integer >= 1, got 0"),
    (dict(max_output=float("nan")), "max_output must be an integer >= 1"),
    (dict(seed=None), "seed must be an integer"),
    (dict(max_output=8.5), "max_output must be an integer"),
])
def test_make_workload_refuses_bad_numbers(kw, match):
    with pytest.raises(ValueError, match=match):
        make_workload(WORKLOAD_TOKENS, 3, prompt_len=(2, 8), **kw)


def test_workload_helpers_refuse_what_they_cannot_draw():
    """n=2.5, mean 0 (math domain error), max_len 0 (every length came out 1): clear errors. A NaN
    arrival never arrived (the replay spun for ever), inf overflowed time.sleep, a negative one
    counted time before the run as queueing."""
    from llmops_lab.engine.workload import WorkloadRequest, output_lengths, run_continuous, run_static
    with pytest.raises(ValueError, match="n must be an integer"):
        make_workload(WORKLOAD_TOKENS, 2.5, prompt_len=(2, 8))
    with pytest.raises(ValueError, match="prompt_len must be two integers"):
        make_workload(WORKLOAD_TOKENS, 2, prompt_len=(2.5, 4))
    for kw, match in ((dict(mean=0), "mean"), (dict(max_len=0), "max_len"), (dict(n=-1), "n must"),
                      (dict(spread=float("nan")), "spread")):
        with pytest.raises(ValueError, match=match):
            output_lengths(**{**dict(n=3, mean=5, spread=1, max_len=10), **kw})
    for t in (float("nan"), float("inf"), -1.0, "0"):
        with pytest.raises(ValueError, match="arrival must be"):
            WorkloadRequest("a", [5, 6], SamplingParams(max_tokens=2), t)
    ok = WorkloadRequest("a", [5, 6], SamplingParams(max_tokens=2), 0.0)
    ok.arrival = float("nan")                           # set after construction: checked by the runs
    for run in (lambda: run_continuous(None, [ok], progress=False), lambda: run_static(None, [ok], 2, progress=False)):
        with pytest.raises(ValueError, match="arrival must be"):
            run()


def test_run_result_statistics_refuse_typos_and_bad_percentiles():
    from llmops_lab.engine.workload import RunResult
    r = RunResult("x", requests=[{"e2e": 1.0, "tpot": None}, {"e2e": 2.0, "tpot": None}, {"e2e": 3.0, "tpot": None}])
    assert r.percentile("e2e", 50) == 2.0 and r.percentile("e2e", 100) == 3.0 and r.percentile("e2e", 0) == 1.0
    assert math.isnan(r.mean("tpot"))                   # not measured (one-token outputs): NaN, as before
    for q in (-50, 200, float("nan")):                  # -50 wrapped to the end of the list
        with pytest.raises(ValueError, match="percentile"):
            r.percentile("e2e", q)
    with pytest.raises(KeyError, match="E2E"):         # a typo read as "not measured"
        r.mean("E2E")


def test_make_workload_edge_values_still_work():
    same = make_workload(WORKLOAD_TOKENS, 5, prompt_len=(2, 8), mean_output=7, spread=0.0)   # a slider at 0
    assert [r.params.max_tokens for r in same] == [7] * 5
    assert all(r.arrival == 0.0 for r in same)                                           # inf: all at once
    assert make_workload(WORKLOAD_TOKENS, 1, prompt_len=(2, 8), max_output=1)[0].params.max_tokens == 1


def test_fit_step_time_refuses_empty_and_non_finite_rows():
    from llmops_lab.engine import experiment
    with pytest.raises(ValueError, match="no rows"):
        experiment.fit_step_time([])
    for bad in (dict(step_s=float("nan")), dict(step_s=float("inf")), dict(context=float("nan"))):
        rows = [{"batch": 1, "context": 8, "step_s": 1e-3}, {"batch": 2, "context": 8, "step_s": 2e-3, **bad}]
        with pytest.raises(ValueError, match="finite batch, context and step_s"):
            experiment.fit_step_time(rows)
    with pytest.raises(ValueError, match="holds batch, context and step_s"):
        experiment.fit_step_time([{"batch": 1, "ctx": 8, "step_s": 1e-3}])          # was KeyError 'context'
    with pytest.raises(ValueError, match="step_s > 0"):                              # fitted (0, 0, 0)
        experiment.fit_step_time([{"batch": 1, "context": 8, "step_s": 0.0}, {"batch": 2, "context": 8, "step_s": -1e-3}])


def _finished_run():
    from llmops_lab.engine.workload import RunResult
    res = RunResult("r", makespan=1.0)
    res.requests = [{"request_id": "a", "arrival": 0.0, "n_in": 4, "n_out": 3}]
    res.steps = [{"num_seqs": 1}]
    return res


@pytest.mark.parametrize("run, kind, seats, match", [
    ("finished", "statc", 2, "kind must be 'static' or 'continuous', got 'statc'"),
    ("finished", "static", 0, "max_num_seqs must be an integer >= 1, got 0"),
    ("finished", "static", 1.5, "max_num_seqs must be an integer >= 1, got 1.5"),
    ("empty", "static", 2, "'x' has no requests"),
    ("no steps", "continuous", 2, "has no steps"),
    ("no output", "static", 2, "no output tokens"),      # was "max_len must be >= 1", a formula's argument
])
def test_predict_refuses_what_it_cannot_predict(run, kind, seats, match):
    from llmops_lab.engine import experiment
    from llmops_lab.engine.workload import RunResult
    fn = lambda B, ctx=0.0: 1e-3
    assert experiment.predict(_finished_run(), fn, "static", 2)["throughput_tok_s"] > 0
    result = {"finished": _finished_run(), "empty": RunResult("x"), "no steps": _finished_run(),
              "no output": _finished_run()}[run]
    if run == "no steps":
        result.steps = []
    if run == "no output":
        result.requests[0]["n_out"] = 0
    with pytest.raises(ValueError, match=match):
        experiment.predict(result, fn, kind, seats)


def test_empty_runs_say_so():
    from llmops_lab.engine import experiment
    from llmops_lab.engine.workload import RunResult
    with pytest.raises(ValueError, match="no continuous runs"):
        experiment.continuous_throughput({})
    with pytest.raises(ValueError, match="no continuous runs"):
        experiment.continuous_throughput({"static": _finished_run()})
    with pytest.raises(ValueError, match="no static runs"):
        experiment.static_throughput({"continuous": _finished_run()})
    with pytest.raises(ValueError, match="'x' has no requests"):
        RunResult("x").summary()
    assert _finished_run().summary()["throughput_tok_s"] == 3.0


@pytest.mark.parametrize("kw, match", [
    (dict(params=[SamplingParams(max_tokens=3)]), "params has 1 entries for 2 prompts"),
    (dict(arrivals=[0.0, 0.0, 0.0]), "arrivals has 3 entries for 2 prompts"),
    (dict(request_ids=["a"]), "request_ids has 1 entries for 2 prompts"),
])
def test_static_batch_refuses_mismatched_lists(tiny, kw, match):
    kw = {"params": [SamplingParams(max_tokens=3)] * 2, **kw}
    with pytest.raises(ValueError, match=match):
        run_static_batch(tiny, [[2, 3], [4, 5, 6]], **kw)


def test_static_batch_refuses_float_token_ids(tiny):
    # left_pad made 5.7 the token 5 before anything checked it; the engine refuses it
    with pytest.raises(ValueError, match="token ids must be integers, got 5.7"):
        run_static_batch(tiny, [[2, 5.7], [4, 5, 6]], [SamplingParams(max_tokens=3)] * 2)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_run_static_refuses_a_batch_of_none(tiny, batch_size):
    wl = make_workload(WORKLOAD_TOKENS, 2, prompt_len=(2, 8), mean_output=2, max_output=4)
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch_size}"):
        run_static(tiny, wl, batch_size, progress=False)
