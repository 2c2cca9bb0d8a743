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


@pytest.fixture(scope="module")
def pair():
    # A draft that often but not always agrees: the target plus noise.
    target = tiny(0)
    draft = tiny(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.08 * torch.randn_like(p))
    return target, draft


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_is_identical_to_target_greedy(pair, k, lean):
    target, draft = pair
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(k))
    want = target.generate(ids, max_new_tokens=40, stop_token_ids=())
    got, stats = SpeculativeDecoder(target, draft, k, lean=lean).generate(ids, 40)
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
    got, stats = SpeculativeDecoder(target, draft, 4, lean=lean).generate(ids, 33, attention_mask=mask)
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
    got, stats = SpeculativeDecoder(target, draft, 4).generate(ids, 40)
    assert len(set(stats.accepted)) > 1                       # the rows did leave holes
    for i in range(3):
        alone = target.generate(ids[i:i + 1], max_new_tokens=40, stop_token_ids=())
        assert got[i, 10:].tolist() == alone[0, 10:].tolist(), f"row {i}"


def test_identical_draft_accepts_everything(pair):
    target, _ = pair
    ids = torch.tensor([[0, 5, 9]])
    got, stats = SpeculativeDecoder(target, target, 4).generate(ids, 20)
    assert stats.alpha == 1.0 and stats.mean_tokens_per_step == 5
    assert torch.equal(got, target.generate(ids, max_new_tokens=20, stop_token_ids=()))


def chi2_critical(df, z=3.09):  # Wilson-Hilferty, upper 0.1% point
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@torch.no_grad()
def test_sampling_matches_the_target_distribution(pair):
    """Thousands of rows of one prompt: the first two new tokens follow the target's distribution."""
    target, draft = pair
    temp, top_k, n = 0.9, 12, 6000
    prompt = torch.tensor([[0, 7, 3, 11]])
    out, stats = SpeculativeDecoder(target, draft, 3).generate(
        prompt.expand(n, -1), 2, temperature=temp, top_k=top_k, generator=torch.Generator().manual_seed(0))
    assert 0 < stats.alpha < 1
    p1 = logits_to_probs(target(prompt)[0, -1], temp, top_k)          # first token
    nxt = torch.cat([prompt.expand(64, -1), torch.arange(64)[:, None]], 1)
    p2 = (p1[:, None] * logits_to_probs(target(nxt)[:, -1], temp, top_k)).sum(0)  # second, marginal
    for probs, col in ((p1, out[:, 4]), (p2, out[:, 5])):
        counts = torch.bincount(col, minlength=64).float()
        expected = probs * n
        assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
        keep = expected > 5
        chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
        assert chi2 < chi2_critical(int(keep.sum()) - 1), chi2


def test_max_tokens_reached_mid_block_truncates(pair):
    target, draft = pair
    ids = torch.tensor([[0, 4, 4]])
    got, _ = SpeculativeDecoder(target, target, 8).generate(ids, 5)   # 9 tokens per step, 5 wanted
    assert got.shape == (1, 8) and torch.equal(got, target.generate(ids, max_new_tokens=5, stop_token_ids=()))


def test_bad_input(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="k"):
        SpeculativeDecoder(target, draft, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder(target, tiny(1, vocab_size=80), 2)
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
    got, stats = SpeculativeDecoder(target, draft, 10 ** 6).generate(ids, 6)
    assert torch.equal(got, target.generate(ids, max_new_tokens=6, stop_token_ids=()))
    assert all(len(t["drafts"]) <= 6 for t in stats.trace)


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
    got, _ = SpeculativeDecoder(target, draft, k, lean=lean).generate(ids, 6)
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


def test_assisted_generation_peer_gives_the_same_tokens(pair):
    from llmops_lab.speculative import experiment
    target, draft = pair
    ids = torch.tensor([[0, 5, 9, 11]])
    res = experiment.compare_assisted(target, draft, ids, new_tokens=12, k=3, repeats=1)
    assert res["same_tokens"] and res["ours_s"] > 0 and res["assisted_s"] > 0


def test_distribution_test_accepts_exact_sampling(pair):
    from llmops_lab.speculative import experiment
    target, draft = pair
    res = experiment.distribution_test(target, draft, torch.tensor([0, 3, 8]), n=1500, temperature=1.0, top_k=10)
    assert res["impossible_tokens"] == 0 and res["p_value"] > 0.001


def test_sweep_k_refuses_no_prompts_or_no_k(pair):
    from llmops_lab.speculative import experiment
    target, draft = pair
    for prompts, ks in (([], (2,)), ([torch.tensor([[0, 4]])], ())):     # was a ZeroDivisionError
        with pytest.raises(ValueError, match="at least one"):
            experiment.sweep_k(target, draft, prompts, ks=ks, new_tokens=4, repeats=1)


def test_sweep_reports_measured_inputs_to_the_formulas(pair):
    from llmops_lab.speculative import experiment
    target, draft = pair
    rows = experiment.sweep_k(target, draft, torch.tensor([[0, 4, 6]]), ks=(2,), new_tokens=8, repeats=1)
    r = rows[0]
    assert 0 <= r["alpha"] <= 1 and r["c"] > 0 and r["verify_cost"] > 0 and r["speedup"] > 0
    assert r["predicted_leviathan"] > 0
    assert r["c_in_loop"] > 0 and r["verify_cost_in_loop"] > 0      # the decoder's own clocks
    from llmops_lab import formulas
    assert r["predicted_in_loop"] == pytest.approx(formulas.speculative_speedup_with_verify_cost(
        min(r["alpha"], 1 - 1e-9), 2, r["c_in_loop"], r["verify_cost_in_loop"]))


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
