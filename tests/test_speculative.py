"""Speculative decoding: lossless greedy, exact sampling distribution, batches, the document's bug."""
import math

import pytest
import torch

from llmops_lab.config import ModelConfig
from llmops_lab.generation import logits_to_probs
from llmops_lab.model import LlamaModel
from llmops_lab.speculative import DocumentSpeculativeDecoder, SpeculativeDecoder

CFG = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1)


def tiny(seed, std=0.3, **kw):
    torch.manual_seed(seed)
    m = LlamaModel(ModelConfig(**{**CFG.__dict__, **kw})).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=std)
    return m


def make_pair(**kw):
    # A draft that often but not always agrees: the target plus noise.
    target = tiny(0, **kw)
    draft = tiny(0, **kw)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.08 * torch.randn_like(p))
    return target, draft


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_is_identical_to_target_greedy(pair, k, lean):
    target, draft = pair
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(k))
    want = target.generate(ids, max_new_tokens=40, stop_token_ids=())
    got, stats = SpeculativeDecoder(target, draft, k, lean=lean).generate(ids, 40, stop_token_ids=())
    assert torch.equal(got, want)
    assert 0 < stats.alpha < 1  # the test exercises both acceptance and rejection


@pytest.mark.parametrize("lean", [True, False])
def test_padded_batch_rows_accept_differently_and_match_greedy(pair, lean):
    target, draft = pair
    g = torch.Generator().manual_seed(5)
    lengths = [9, 3, 6, 1]
    ids = torch.full((4, 9), 2)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = torch.randint(2, 64, (n,), generator=g)
        mask[i, 9 - n:] = 1
    got, stats = SpeculativeDecoder(target, draft, 4, lean=lean).generate(ids, 33, attention_mask=mask,
                                                                      stop_token_ids=())
    for i, n in enumerate(lengths):
        alone = target.generate(ids[i:i + 1, 9 - n:], max_new_tokens=33, stop_token_ids=())
        assert got[i, 9:].tolist() == alone[0, n:].tolist(), f"row {i}"
    per_step = stats.accepted
    assert len(set(per_step)) > 1


def test_a_windowed_target_in_a_batch_matches_its_greedy_rows(pair):
    """Rows that accept different numbers of drafts leave holes in a batch's cache; a sliding window
    measured in cache slots showed a row fewer tokens than its window, and the tokens departed from
    the target's own greedy ones (at the first new token in a Mistral-shaped case). The window is
    measured in token positions now."""
    target = tiny(0, sliding_window=6, model_type="mistral")
    _, draft = pair
    ids = torch.randint(2, 64, (3, 10), generator=torch.Generator().manual_seed(3))
    got, stats = SpeculativeDecoder(target, draft, 4).generate(ids, 40, stop_token_ids=())
    assert len(set(stats.accepted)) > 1                       # the rows did leave holes
    for i in range(3):
        alone = target.generate(ids[i:i + 1], max_new_tokens=40, stop_token_ids=())
        assert got[i, 10:].tolist() == alone[0, 10:].tolist(), f"row {i}"


def test_identical_draft_accepts_everything(pair):
    target, _ = pair
    ids = torch.tensor([[0, 5, 9]])
    got, stats = SpeculativeDecoder(target, target, 4).generate(ids, 20, stop_token_ids=())
    assert stats.alpha == 1.0 and stats.mean_tokens_per_step == 5
    assert torch.equal(got, target.generate(ids, max_new_tokens=20, stop_token_ids=()))


def test_default_stops_at_the_targets_eos_as_generate_does():
    """With default arguments the decoder ran past EOS (stop_token_ids defaulted to none) and padded
    with 0; now it stops where the target's own generate() stops and pads as generate pads."""
    ids = torch.tensor([[0, 7, 3, 11], [0, 9, 4, 2]])
    free = tiny(0).generate(ids, max_new_tokens=20, stop_token_ids=())[:, 4:].tolist()
    # an eos id that row 0 emits a few tokens in, and row 1 later or never: both stop cases and padding
    eos = next(t for t in free[0][3:] if t not in free[0][:3] and t not in free[1][:8])
    target, draft = make_pair(eos_token_id=eos)
    for k in (1, 3):
        dec = SpeculativeDecoder(target, draft, k)
        want = target.generate(ids, max_new_tokens=20)
        got, _ = dec.generate(ids, 20)
        assert eos in want[0, 4:].tolist() and torch.equal(got, want), k
        assert torch.equal(dec.generate(ids[:1], 20)[0], target.generate(ids[:1], max_new_tokens=20))
        for kw in (dict(pad_token_id=5), dict(stop_token_ids=())):
            assert torch.equal(dec.generate(ids, 20, **kw)[0], target.generate(ids, max_new_tokens=20, **kw)), kw
    with pytest.raises(ValueError, match="pad_token_id"):
        SpeculativeDecoder(target, draft, 2).generate(ids, 4, pad_token_id=64)


def chi2_critical(df, z=3.09):  # Wilson-Hilferty, upper 0.1% point
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def target_marginals(target, prompt, n_tokens, temp, top_k):
    """The target's exact marginal distribution of each of the next n_tokens, by enumerating every
    prefix of nonzero probability (top_k keeps that at top_k ** (n_tokens - 1) prefixes)."""
    prefixes, weights, out = prompt, torch.ones(1), []
    for j in range(n_tokens):
        probs = logits_to_probs(target(prefixes)[:, -1], temp, top_k).double()      # [m, V]
        joint = weights.double()[:, None] * probs
        out.append(joint.sum(0))
        if j < n_tokens - 1:
            rows, toks = joint.nonzero(as_tuple=True)
            prefixes = torch.cat([prefixes[rows], toks[:, None]], 1)
            weights = joint[rows, toks]
    return out


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 2])
def test_sampling_matches_the_target_distribution(pair, k):
    """Thousands of rows of one prompt, k + 1 new tokens each: every new token's marginal follows the
    target's. The first step drafts k tokens, so token k+1 is the bonus token wherever a row
    accepted all k: a bonus drawn from the wrong position fails here (it passed when the test
    decoded 2 tokens at k=3, k shrank to fit them and no bonus was ever emitted)."""
    target, draft = pair
    temp, top_k, n = 0.9, 12, 6000
    prompt = torch.tensor([[0, 7, 3, 11]])
    out, stats = SpeculativeDecoder(target, draft, k).generate(
        prompt.expand(n, -1), k + 1, temperature=temp, top_k=top_k, generator=torch.Generator().manual_seed(0),
        stop_token_ids=())
    assert 0 < stats.alpha < 1
    assert len(stats.trace[0]["drafts"]) == k
    bonus_rows = sum(a == k for a in stats.accepted[:n])      # first step: every row, in order
    assert bonus_rows > n // 20, "too few bonus tokens for the test to see them"
    for j, probs in enumerate(target_marginals(target, prompt, k + 1, temp, top_k)):
        counts = torch.bincount(out[:, 4 + j], minlength=64).double()
        expected = probs * n
        assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
        keep = expected > 5
        chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
        assert chi2 < chi2_critical(int(keep.sum()) - 1), (j, chi2)


def test_max_tokens_reached_mid_block_truncates(pair):
    target, draft = pair
    ids = torch.tensor([[0, 4, 4]])
    # k = 8 shrinks to 4 drafts: with the target's own token they make the 5 wanted in one step
    got, stats = SpeculativeDecoder(target, target, 8).generate(ids, 5, stop_token_ids=())
    assert got.shape == (1, 8) and torch.equal(got, target.generate(ids, max_new_tokens=5, stop_token_ids=()))
    assert [len(t["drafts"]) for t in stats.trace] == [4] and stats.trace[0]["bonus"]
    assert stats.drafts == 4                 # what sweep_k's per-draft cost divides by (it took k = 8)


def test_bad_input(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="k"):
        SpeculativeDecoder(target, draft, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, tiny(1, vocab_size=80), 2)
    # the same vocabulary size with other special ids is another tokenizer (was accepted, alpha 0)
    for other in (dict(bos_token_id=5), dict(eos_token_id=6), dict(eos_token_id=[1, 6]), dict(bos_token_id=None)):
        with pytest.raises(ValueError, match="special tokens"):
            SpeculativeDecoder(target, tiny(1, **other), 2)
    SpeculativeDecoder(target, tiny(1, eos_token_id=[1]), 2)      # one eos id, as a list: the same
    with pytest.raises(ValueError, match="context"):
        SpeculativeDecoder(target, draft, 2).generate(torch.zeros(1, 250, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SpeculativeDecoder(target, draft, 2).generate(torch.zeros(1, 5, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SpeculativeDecoder(target, draft, 2).generate(torch.zeros(1, 5, dtype=torch.long), 2.5)
    for bad in ("5", 5.0, (5, 1.5), (-1,), (10 ** 6,)):   # a stop that can never match ran to the end
        with pytest.raises(ValueError, match="stop_token_ids"):
            SpeculativeDecoder(target, draft, 2).generate(torch.zeros(1, 5, dtype=torch.long), 4, stop_token_ids=bad)
        with pytest.raises(ValueError, match="stop_token_ids"):
            target.generate(torch.zeros(1, 5, dtype=torch.long), max_new_tokens=4, stop_token_ids=bad)


def test_bad_k_inputs_and_masks(pair):
    """k=2.5 failed naming an internal max_seq_len, k="3" raw, k=True passed as 1; a list of ids
    was an AttributeError; a mask of 2s counted each prompt twice."""
    target, draft = pair
    for k in (2.5, "3", True):
        with pytest.raises(ValueError, match="k .draft tokens"):
            SpeculativeDecoder(target, draft, k)
    dec = SpeculativeDecoder(target, draft, 2)
    with pytest.raises(TypeError, match="tensor"):
        dec.generate([[3, 4, 5]], 2)
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for mask, match in (([[1, 1, 1], [1, 1, 1]], "shape"), (torch.full((2, 3), 2), "0 .padding. and 1"),
                        (torch.tensor([[1, 1, 0], [1, 1, 1]]), "left"), (torch.tensor([[0, 0, 0], [1, 1, 1]]), "at least one")):
        with pytest.raises(ValueError, match=match):
            dec.generate(ids, 2, attention_mask=mask)
        with pytest.raises(ValueError, match=match):
            target.generate(ids, max_new_tokens=2, attention_mask=mask)


def test_a_huge_k_drafts_no_more_than_is_left(pair):
    """k = 10**6 asked for a cache of (k + 1) * (max_new_tokens + 1) slots (1.9 TiB at 500 tokens);
    k = 2000 for 2 tokens drafted ~1000 tokens a step. Now k stops at what is left to generate."""
    target, draft = pair
    ids = torch.tensor([[0, 4, 4]])
    got, stats = SpeculativeDecoder(target, draft, 10 ** 6).generate(ids, 6, stop_token_ids=())
    assert torch.equal(got, target.generate(ids, max_new_tokens=6, stop_token_ids=()))
    assert all(len(t["drafts"]) <= 5 for t in stats.trace)


def test_the_last_step_drafts_only_what_is_needed(pair):
    """left - 1 drafts and the target's own token make the left tokens: the last step drafted one
    token too many, a 1-token request drafted and verified 2 positions, and the trace marked a
    bonus that was thrown away."""
    target, draft = pair
    ids = torch.tensor([[0, 4, 9]])
    got, stats = SpeculativeDecoder(target, target, 4).generate(ids, 6, stop_token_ids=())
    assert [(len(t["drafts"]), t["accepted"], t["bonus"]) for t in stats.trace] == [(4, 4, True), (0, 0, False)]
    assert torch.equal(got, target.generate(ids, max_new_tokens=6, stop_token_ids=()))
    got, stats = SpeculativeDecoder(target, draft, 4).generate(ids, 1, stop_token_ids=())
    assert stats.trace == [{"drafts": [], "accepted": 0, "fix": int(got[0, -1]), "bonus": False}]
    assert torch.equal(got, target.generate(ids, max_new_tokens=1, stop_token_ids=()))
    # sampled, a plain target step draws what the target alone draws from the same generator
    batch = ids.expand(3, -1)
    got, _ = SpeculativeDecoder(target, draft, 4).generate(batch, 1, temperature=0.9,
                                                           generator=torch.Generator().manual_seed(1))
    want = target.generate(batch, max_new_tokens=1, temperature=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, want)
    # all 4 drafts accepted, but the last is a stop: the bonus after them is discarded
    free = target.generate(ids, max_new_tokens=10, stop_token_ids=())[0, 3:].tolist()
    assert free[3] not in free[:3]                      # the stop is the 4th token, not earlier
    got, stats = SpeculativeDecoder(target, target, 4).generate(ids, 10, stop_token_ids=free[3])
    assert stats.trace[0]["accepted"] == 4 and not stats.trace[0]["bonus"]
    assert got[0, 3:].tolist() == free[:4]


def test_one_stop_token_may_be_a_plain_integer(pair):
    target, draft = pair
    ids = torch.tensor([[0, 4, 4]])
    free = target.generate(ids, max_new_tokens=8, stop_token_ids=())
    stop = int(free[0, 5])
    dec = SpeculativeDecoder(target, draft, 3)
    assert torch.equal(dec.generate(ids, 8, stop_token_ids=stop)[0], dec.generate(ids, 8, stop_token_ids=[stop])[0])
    assert stop in dec.generate(ids, 8, stop_token_ids=stop)[0][0, 3:].tolist()


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("k", [4, 300])
def test_drafts_shrink_at_the_end_of_the_context(pair, lean, k):
    """250 prompt tokens + 6 new fit a context of 256, but pending + k drafts scored at once would
    not: the last steps draft fewer tokens instead of failing midway. In a batch, a row that has
    finished stops moving, so it cannot push the others past the context either."""
    target, draft = pair
    ids = torch.randint(2, 64, (1, 250), generator=torch.Generator().manual_seed(3))
    want = target.generate(ids, max_new_tokens=6, stop_token_ids=())
    got, _ = SpeculativeDecoder(target, draft, k, lean=lean).generate(ids, 6, stop_token_ids=())
    assert torch.equal(got, want)
    ids = torch.full((2, 240), 2)
    ids[0] = torch.randint(2, 64, (240,), generator=torch.Generator().manual_seed(5))
    ids[1, 200:] = torch.randint(2, 64, (40,), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 240, dtype=torch.long)
    mask[1, :200] = 0                                  # row 1: 40 tokens, left-padded
    want = target.generate(ids[1:, 200:], max_new_tokens=16, stop_token_ids=())[0, 40:].tolist()
    row0 = target.generate(ids[:1], max_new_tokens=4, stop_token_ids=())[0, 240:].tolist()
    stop = next(t for t in row0 if t not in want)      # row 0 (240 tokens) stops early; row 1 goes on
    got, _ = SpeculativeDecoder(target, draft, 4, lean=lean).generate(ids, 16, attention_mask=mask,
                                                                      stop_token_ids=(stop,))
    assert got[1, 240:].tolist() == want
    assert got[0, 240:240 + row0.index(stop) + 1].tolist() == row0[:row0.index(stop) + 1]


@pytest.mark.parametrize("lean", [True, False])
def test_prompt_and_new_tokens_may_reach_the_context_plus_one(pair, lean):
    """As in ``generate``, the last new token is sampled and never fed back: 250 + 7 tokens in a
    context of 256, and a prompt of the whole context, get their tokens; one more is refused."""
    target, draft = pair
    ctx = target.config.max_position_embeddings
    dec = SpeculativeDecoder(target, draft, 4, lean=lean)
    g = torch.Generator().manual_seed(8)
    for n in (ctx - 6, ctx):
        ids = torch.randint(2, 64, (1, n), generator=g)
        want = target.generate(ids, max_new_tokens=ctx + 1 - n, stop_token_ids=())
        got, _ = dec.generate(ids, ctx + 1 - n, stop_token_ids=())
        assert got.shape[1] == ctx + 1 and torch.equal(got, want)
    ids = torch.full((2, ctx - 4), 2)                   # a batch: row 1 left-padded to 20 tokens
    ids[0] = torch.randint(2, 64, (ctx - 4,), generator=g)
    ids[1, -20:] = torch.randint(2, 64, (20,), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :-20] = 0
    got, _ = dec.generate(ids, 5, attention_mask=mask, stop_token_ids=())
    assert torch.equal(got[0], target.generate(ids[:1], max_new_tokens=5, stop_token_ids=())[0])
    assert torch.equal(got[1, -25:], target.generate(ids[1:, -20:], max_new_tokens=5, stop_token_ids=())[0])
    with pytest.raises(ValueError, match="plus the one token sampled last"):
        dec.generate(ids[:1], 6, stop_token_ids=())
    with pytest.raises(ValueError, match="exceeds the context"):
        dec.generate(torch.full((1, ctx + 1), 2), 1, stop_token_ids=())


def test_attention_mask_must_match_the_ids(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="attention_mask"):
        SpeculativeDecoder(target, draft, 2).generate(torch.ones(1, 3, dtype=torch.long), 4,
                                                      attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        SpeculativeDecoder(target, draft, 2).generate(torch.ones(2, 3, dtype=torch.long), 4,
                                                      attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_document_decoder_departs_from_greedy_by_its_off_by_one(pair):
    target, draft = pair

    class Tok:  # the document's decoder only encodes and decodes
        def encode(self, s, return_tensors=None):
            return torch.tensor([[0] + [2 + ord(c) % 60 for c in s]])

        def decode(self, ids):
            return " ".join(map(str, ids.tolist()))

    doc = DocumentSpeculativeDecoder(target, draft, Tok(), k=3)
    ids = Tok().encode("abcde")
    out, trace = doc.generate_ids(ids, max_tokens=40)
    greedy = target.generate(ids, max_new_tokens=out.shape[1] - ids.shape[1], stop_token_ids=())
    rejected = [s for s in trace if "appended" in s]
    assert rejected, "the draft was never rejected: the test proves nothing"
    wrong = [s for s in rejected if s["appended"] != s["target_would_append"]]
    assert wrong and not torch.equal(out, greedy)
    assert out.shape[1] >= 40  # counts the prompt in max_tokens and may overshoot it
    assert isinstance(doc.generate("abc", max_tokens=12), str)


def test_assisted_generation_peer_gives_the_same_tokens_at_the_same_k(pair, monkeypatch):
    """transformers drafted by its own policy (up to 20 tokens, cut by a confidence threshold), so
    the comparison set two drafting policies against each other; now it drafts our k."""
    from transformers.generation import candidate_generator
    from llmops_lab.speculative import experiment
    target, draft = pair
    drafted = []
    original = candidate_generator.AssistedCandidateGenerator.get_candidates

    def spy(self, input_ids, *args, **kwargs):
        out = original(self, input_ids, *args, **kwargs)
        drafted.append(out[0].shape[1] - input_ids.shape[1])
        return out
    monkeypatch.setattr(candidate_generator.AssistedCandidateGenerator, "get_candidates", spy)
    ids = torch.tensor([[0, 5, 9, 11]])
    res = experiment.compare_assisted(target, draft, ids, new_tokens=12, k=3, repeats=1)
    assert res["same_tokens"] and res["ours_s"] > 0 and res["assisted_s"] > 0
    assert res["assisted_fixed_k"] and res["k"] == 3
    assert drafted and max(drafted) == 3 and drafted.count(3) >= len(drafted) // 2, drafted


@pytest.mark.parametrize("k", [1, 3])
def test_distribution_test_accepts_exact_sampling_at_its_k(pair, k):
    """It decoded one token, so its k shrank to 1 and no bonus token was ever tested; now it decodes
    k + 1 and tests token k+1 (the bonus in rows that accepted all k) as well as the first."""
    from llmops_lab.speculative import experiment
    target, draft = pair
    res = experiment.distribution_test(target, draft, torch.tensor([0, 3, 8]), n=1500, temperature=1.0, top_k=10, k=k)
    assert res["impossible_tokens"] == 0 and res["p_value"] > 0.001
    assert res["k"] == k and res["token_k_plus_1"]["bonus_rows"] > 100
    assert res["p_value"] == min(1.0, 2 * min(res["first_token"]["p_value"], res["token_k_plus_1"]["p_value"]))


def test_sweep_k_refuses_no_prompts_or_no_k(pair):
    from llmops_lab.speculative import experiment
    target, draft = pair
    for prompts, ks in (([], (2,)), ([torch.tensor([[0, 4]])], ())):     # was a ZeroDivisionError
        with pytest.raises(ValueError, match="at least one"):
            experiment.sweep_k(target, draft, prompts, ks=ks, new_tokens=4, repeats=1)


def test_sweep_reports_measured_inputs_to_the_formulas(pair):
    """Each row's alpha and tokens per step are the decoder's own (a greedy run is deterministic, so
    the same decode gives them again), the speedup is the target's time over the speculative one,
    and every prediction is its formula at those inputs."""
    from llmops_lab import formulas
    from llmops_lab.speculative import experiment
    target, draft = pair
    prompt = torch.tensor([[0, 4, 9]])             # a prompt whose drafts are sometimes accepted
    rows = experiment.sweep_k(target, draft, prompt, ks=(2, 3), new_tokens=8, repeats=1)
    assert [r["k"] for r in rows] == [2, 3]
    for r in rows:
        k = r["k"]
        _, st = SpeculativeDecoder(target, draft, k).generate(prompt, 8, stop_token_ids=())
        assert r["alpha"] == st.alpha and 0 < r["alpha"] < 1
        assert r["tokens_per_step"] == pytest.approx(st.mean_tokens_per_step)
        assert r["speedup"] == pytest.approx(r["target_seconds"] / r["seconds"])     # not inverted
        assert r["c"] > 0 and r["verify_cost"] > 0 and r["c_in_loop"] > 0 and r["verify_cost_in_loop"] > 0
        assert r["expected_tokens_per_step"] == pytest.approx(formulas.expected_tokens_per_step(r["alpha"], k))
        assert r["predicted_leviathan"] == pytest.approx(formulas.speculative_speedup(r["alpha"], k, r["c"]))
        assert r["predicted_with_verify_cost"] == pytest.approx(
            formulas.speculative_speedup_with_verify_cost(r["alpha"], k, r["c"], r["verify_cost"]))
        assert r["predicted_in_loop"] == pytest.approx(formulas.speculative_speedup_with_verify_cost(
            min(r["alpha"], 1 - 1e-9), k, r["c_in_loop"], r["verify_cost_in_loop"]))
    # a draft identical to the target: every draft accepted, k + 1 tokens a step but the last
    r = experiment.sweep_k(target, target, prompt, ks=(3,), new_tokens=8, repeats=1)[0]
    assert r["alpha"] == 1.0 and r["tokens_per_step"] == pytest.approx(8 / 2)   # 4 + 4 (3 drafts, then 3)


def test_sweep_k_samples_the_baseline_as_it_samples_the_speculative_runs(pair, monkeypatch):
    """At temperature > 0 the target alone ran greedy (no softmax, no multinomial): the speedup was
    measured against a cheaper baseline."""
    from llmops_lab.speculative import experiment
    target, draft = pair
    calls = []
    real = experiment.generate_lean

    def spy(model, ids, new_tokens, **kwargs):
        calls.append(kwargs)
        return real(model, ids, new_tokens, **kwargs)
    monkeypatch.setattr(experiment, "generate_lean", spy)
    experiment.sweep_k(target, draft, torch.tensor([[0, 4, 6]]), ks=(2,), new_tokens=6, temperature=0.7, repeats=1)
    assert calls and all(c["temperature"] == 0.7 and isinstance(c["generator"], torch.Generator) for c in calls)
    assert len({c["generator"].initial_seed() for c in calls}) == 1      # seeded, the same each call


@pytest.mark.parametrize("n, match", [(0, "n must be >= 1"), (1, "n=1 is too small"), (4, "use a larger n")])
def test_distribution_test_refuses_too_few_cells(pair, n, match):
    # Fewer than 5 draws in all: no cell expects 5, so the chi-square test has nothing to test.
    from llmops_lab.speculative import experiment
    target, draft = pair
    with pytest.raises(ValueError, match=match):
        experiment.distribution_test(target, draft, torch.tensor([0, 3, 8]), n=n, k=2)


def test_distribution_test_refuses_a_flat_wide_distribution():
    # The prober's case: 320 tokens, 300 draws, every expected count below 5.
    from llmops_lab.speculative import experiment
    t = tiny(0, std=0.01, vocab_size=320)
    with pytest.raises(ValueError, match="too small for this distribution"):
        experiment.distribution_test(t, t, torch.tensor([0, 3, 8]), n=300, temperature=1.0, k=2)


@pytest.mark.parametrize("ids, batch_sizes, match", [
    (torch.tensor([[0, 4, 6], [0, 5, 7]]), (1, 4), "batch size 4 .* 2 rows"),
    (torch.tensor([[0, 4, 6], [0, 5, 7]]), (0, 1), "batch size 0"),
    (torch.tensor([0, 4, 6]), (1,), r"\[rows, S\] tensor"),
])
def test_sweep_batch_refuses_batches_it_cannot_fill(pair, ids, batch_sizes, match):
    from llmops_lab.speculative import experiment
    target, draft = pair
    with pytest.raises(ValueError, match=match):
        experiment.sweep_batch(target, draft, ids, batch_sizes=batch_sizes, k=2, new_tokens=2, repeats=1)
    with pytest.raises(TypeError, match="prompts_ids must be a"):
        experiment.sweep_batch(target, draft, [[0, 4, 6]], batch_sizes=(1,), k=2, new_tokens=2, repeats=1)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_batch_goes_on_after_a_row_reaches_the_context(k):
    """Row 0 reaches the context's last position, which caps the step at k = 0 while row 1 still
    needs tokens; the draft, not fed in that step, was rolled back as if it had been ("cannot
    truncate a cache of length 38 to 39", 9 of 180 seeded runs). Every row is its greedy self."""
    target, draft = make_pair(max_position_embeddings=40)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        ids = torch.full((2, 31), 2)
        mask = torch.ones(2, 31, dtype=torch.long)
        ids[0] = torch.randint(2, 64, (31,), generator=g)            # 31 + 10 new = the context + 1
        ids[1, -4:] = torch.randint(2, 64, (4,), generator=g)
        mask[1, :-4] = 0
        got, _ = SpeculativeDecoder(target, draft, k).generate(ids, 10, attention_mask=mask, stop_token_ids=())
        for b, row in enumerate((ids[0], ids[1, -4:])):
            alone = target.generate(row[None], max_new_tokens=10, stop_token_ids=())
            assert got[b, 31:].tolist() == alone[0, len(row):].tolist(), (seed, b)


def test_tokens_per_step_counts_only_tokens_kept(pair):
    """A row that stops at its first token kept 1 token in its 1 step; the 4 drafts accepted after
    the stop were counted too (5.0)."""
    target, _ = pair
    ids = torch.tensor([[0, 4, 9]])
    first = target.generate(ids, max_new_tokens=1, stop_token_ids=())[0, -1].item()
    got, st = SpeculativeDecoder(target, target, 4).generate(ids, 12, stop_token_ids=first)
    assert got.shape[1] == 4 and st.steps == 1
    assert st.accepted == [4] and st.mean_tokens_per_step == 1.0
