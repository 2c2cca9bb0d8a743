"""The embedded tokenizer and target/draft pair: offline loading, and our runtime vs transformers."""
import dataclasses
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmops_lab
from llmops_lab import corpus
from llmops_lab.evaluate import encode, held_out_prompts

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module", params=["target", "draft"])
def which(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    return llmops_lab.load_tokenizer("target")


def test_tokenizer_loads_offline_with_transformers(tokenizer):
    tok = AutoTokenizer.from_pretrained(str(llmops_lab.embedded_model_path("target")))
    text = "ROMEO. But soft, what light through yonder window breaks?"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(tok) == 4096
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_pair_shapes_match_the_brief():
    t, d = (llmops_lab.load_model(w, device="cpu") for w in ("target", "draft"))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert 8e6 <= n(t) <= 30e6 and 1e6 <= n(d) <= 3e6
    assert t.config.num_key_value_heads < t.config.num_attention_heads  # grouped-query attention
    assert t.config.max_position_embeddings >= 1024
    assert t.config.vocab_size == d.config.vocab_size


@torch.no_grad()
def test_logits_match_transformers(which, tokenizer):
    ours = llmops_lab.load_model(which, device="cpu", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(llmops_lab.embedded_model_path(which)),
                                                  dtype=torch.float32).eval()
    ids = torch.cat([torch.tensor([0]), encode(tokenizer, corpus.read_slice("validation")[:4000])])[None, :512]
    assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4


def test_64_greedy_tokens_match_transformers(which, tokenizer):
    ours = llmops_lab.load_model(which, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(str(llmops_lab.embedded_model_path(which)),
                                                  dtype=torch.float32).eval()
    prompts = held_out_prompts(tokenizer, corpus.read_slice("validation"), n=3, prompt_tokens=24)
    # batch 1
    a = ours.generate(prompts[0][None], max_new_tokens=64, stop_token_ids=())
    b = theirs.generate(prompts[0][None], max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert torch.equal(a, b)
    # a left-padded batch of three prompts of different lengths
    lengths = [24, 13, 6]
    ids = torch.full((3, 24), tokenizer.pad_token_id)
    mask = torch.zeros(3, 24, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        ids[i, 24 - n:], mask[i, 24 - n:] = p[:n], 1
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=64, stop_token_ids=())
    b = theirs.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=None,
                        pad_token_id=2)
    assert torch.equal(a, b)


def test_model_card_records_the_measurements():
    card = json.loads((llmops_lab.loader.DATA_DIR / "models" / "card.json").read_text())
    assert card["measured"]["greedy_acceptance"] >= 0.5, "a draft that rarely agrees teaches nothing"
    for w in ("target", "draft"):
        assert card["training"][w]["tokens_seen"] > 0 and card["measured"]["val_perplexity_1024"][w] > 1
    text = (llmops_lab.loader.DATA_DIR / "models" / "README.md").read_text()
    assert "python -m llmops_lab.train" in text and f"{card['measured']['greedy_acceptance']:.3f}" in text


def test_model_card_is_what_write_card_renders():
    """The committed card is the text rendered from card.json, so a wording fix in model_card.py
    reaches README.md. Its val loss column is train.py's final evaluate() (64 windows: the card
    said 16, the in-loop evaluation's count)."""
    from llmops_lab.model_card import CARD, render_card
    card = json.loads((llmops_lab.loader.DATA_DIR / "models" / "card.json").read_text())
    text = render_card(card)
    assert CARD.read_text() == text
    assert "first 64 consecutive 1024-token" in text and "over 16 windows" not in text
    assert "94,208 of its 94,959 tokens" in text        # perplexity scores whole windows only


def test_generate_text_round_trip(tokenizer):
    m = llmops_lab.load_model("target", device="cpu")
    out = llmops_lab.generate_text(m, tokenizer, ["HAMLET.", "Enter"], max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(s, str) and s for s in out)
    with pytest.raises(ValueError, match="empty"):
        llmops_lab.generate_text(m, tokenizer, "", max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        llmops_lab.generate_text(m, tokenizer, [], max_new_tokens=4)      # was an IndexError
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:               # generate_text pads on the left and leaves the caller's tokenizer as it was
        assert llmops_lab.generate_text(m, tokenizer, ["HAMLET.", "Enter"], max_new_tokens=8) == out
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = side


def test_embedded_fingerprint_names_the_weights():
    import hashlib
    fp = llmops_lab.loader.embedded_fingerprint()
    assert set(fp) == {"target", "draft"} and fp["target"] != fp["draft"]
    path = llmops_lab.embedded_model_path("draft") / "model.safetensors"
    assert fp["draft"] == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_distill_weight_out_of_range_is_refused_before_training():
    from llmops_lab.train import train_model
    for w in (-0.1, 1.5):
        with pytest.raises(ValueError, match="distill_weight"):
            train_model("draft", steps=1, lr=1e-3, batch=1, distill_weight=w)


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps"), (dict(steps=-5), "steps"), (dict(batch=0), "batch"),
                                       (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr")])
def test_bad_run_numbers_are_refused_before_training(kw, match):
    """steps=0 used to load the corpus and the model, then fail on an empty log (IndexError)."""
    from llmops_lab.train import train_model
    with pytest.raises(ValueError, match=match):
        train_model("draft", **{**dict(steps=1, lr=1e-3, batch=1), **kw})


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--lr", "0"], ["--batch", "0"],
                                  # these reached the corpus download (and with "all" would have
                                  # rewritten the slices and the tokenizer) before being refused
                                  ["--distill-weight", "5"], ["--distill-weight", "nan"], ["--threads", "-1"],
                                  ["--seq-len", "4096"]])
def test_train_cli_refuses_zero_instead_of_using_the_default(flag, monkeypatch):
    """``--steps 0`` used to mean the default 1200 steps (``a.steps or default``)."""
    from llmops_lab import corpus as corpus_mod
    from llmops_lab import train
    monkeypatch.setattr(corpus_mod, "fetch_texts", lambda: pytest.fail("fetched before the check"))
    with pytest.raises(SystemExit) as e:
        train.main(["draft", *flag])
    assert e.value.code == 2


def test_greedy_agreement_of_a_model_with_itself_is_one(tokenizer):
    from llmops_lab.evaluate import greedy_agreement
    m = llmops_lab.load_model("target", device="cpu")            # parameters that require grad
    prompts = held_out_prompts(tokenizer, corpus.read_slice("validation"), n=2, prompt_tokens=8)
    agree = greedy_agreement(m, m, prompts, new_tokens=6)
    assert agree["alpha"] == 1.0 and agree["per_prompt"] == [1.0, 1.0]
    other = llmops_lab.LlamaModel(dataclasses.replace(m.config, vocab_size=8192))
    with pytest.raises(ValueError, match="vocabulary"):                # alpha 0 with no word
        greedy_agreement(m, other, prompts, new_tokens=2)


def test_card_tells_resumed_runs_from_continued_ones():
    from llmops_lab.model_card import _chain
    cmds = ["train draft --steps 800 --max-minutes 25", "train draft --steps 800", "train draft --steps 1800"]
    assert _chain(cmds) == ("`train draft --steps 800 --max-minutes 25`, resumed as `train draft --steps 800`, "
                            "continued as `train draft --steps 1800`")
    assert _chain(["train target"]) == "`train target`"
