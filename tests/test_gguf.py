"""GGUF export: the RoPE row permutation, read-back within each format's error bound, and
llama.cpp running the exported file: greedy tokens equal ours at F32, perplexity close at Q8_0."""
import dataclasses

import numpy as np
import pytest
import torch

from llmops_lab.config import ModelConfig
from llmops_lab.corpus import read_slice
from llmops_lab.evaluate import encode, held_out_prompts, perplexity
from llmops_lab.loader import load_model, load_tokenizer
from llmops_lab.model import apply_rope
from llmops_lab.quant.gguf import check_exportable, permute_rope_rows, unpermute_rope_rows
from llmops_lab.quant.llama_cpp_peer import llama_cpp_available

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'llmops-lab[gguf]')")
needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(),
                                     reason="llama_cpp is not importable (pip install llama-cpp-python)")


def test_permuted_rows_give_the_same_rope_in_pair_order():
    """Half-split RoPE on q = W x equals interleaved-pair RoPE on (P W) x, read back in half order."""
    H, D, d_in, S = 3, 8, 16, 5
    torch.manual_seed(0)
    W, x = torch.randn(H * D, d_in), torch.randn(S, d_in)
    pos = torch.arange(S, dtype=torch.float32)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(0, D, 2) / D)                    # [S, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ours = apply_rope((x @ W.T).view(S, H, D).transpose(0, 1)[None], cos[None], sin[None])[0]  # [H, S, D]

    Wp = torch.from_numpy(permute_rope_rows(W.numpy(), H))
    q = (x @ Wp.T).view(S, H, D // 2, 2)                                    # llama.cpp: adjacent pairs
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    pairs = torch.stack([q[..., 0] * c - q[..., 1] * s, q[..., 0] * s + q[..., 1] * c], -1)
    theirs = pairs.reshape(S, H * D).numpy()
    back = unpermute_rope_rows(theirs.T, H).T                               # pair order -> half order
    torch.testing.assert_close(torch.from_numpy(back.copy()).view(S, H, D).transpose(0, 1), ours)
    np.testing.assert_array_equal(unpermute_rope_rows(Wp.numpy(), H), W.numpy())


def test_unaligned_rows_are_refused_for_block_formats():
    c = ModelConfig(vocab_size=64, hidden_size=40, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_exportable(c, "Q4_0")
    check_exportable(c, "F16")
    with pytest.raises(ValueError, match="biases"):
        check_exportable(dataclasses.replace(c, hidden_size=64, attention_bias=True), "F32")


@pytest.fixture(scope="module")
def draft():
    return load_model("draft", device="cpu"), load_tokenizer("draft")


@pytest.fixture(scope="module")
def exported(draft, tmp_path_factory):
    from llmops_lab.quant.gguf import export_gguf
    model, tok = draft
    folder = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tok, folder / f"draft-{q}.gguf", q) for q in ("F32", "Q8_0", "Q4_0")}


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_export_reads_back_within_the_bound(draft, exported, qtype):
    from llmops_lab.quant.gguf import check_gguf
    model, tok = draft
    report = check_gguf(exported[qtype], model, tok)
    assert report["mismatches"] == []
    assert report["ok"], [r for r in report["tensors"] if r["err_over_bound"] > 1]
    types = {r["type"] for r in report["tensors"]}
    assert types == ({"F32"} if qtype == "F32" else {"F32", qtype})
    if qtype == "F32":
        assert all(r["max_err"] == 0 for r in report["tensors"])
    sizes = {q: p.stat().st_size for q, p in exported.items()}
    assert sizes["F32"] > 3 * sizes["Q8_0"] > 5 * sizes["Q4_0"]   # 32, 8.5 and 4.5 bits per weight


@pytest.fixture(scope="module")
def peers(exported):
    from llmops_lab.quant.llama_cpp_peer import LlamaCppPeer
    # One thread: llama.cpp's threads spin at barriers and crawl when the cores are shared.
    ps = {q: LlamaCppPeer(p, n_ctx=256, n_threads=1) for q, p in exported.items() if q in ("F32", "Q8_0")}
    ps["F32 kv-f32"] = LlamaCppPeer(exported["F32"], n_ctx=256, n_threads=1, kv_f32=True)
    yield ps
    for p in ps.values():
        p.close()


@needs_llama_cpp
def test_llama_cpp_greedy_equals_ours_at_f32(draft, peers):
    model, tok = draft
    for p in held_out_prompts(tok, read_slice("validation"), n=3, prompt_tokens=24):
        ours = model.generate(p[None], max_new_tokens=16, stop_token_ids=())
        theirs = peers["F32"].generate(p[None], max_new_tokens=16, stop_token_ids=())
        assert theirs.tolist() == ours.tolist()
    x = p[None]
    # fp32 weights and an fp32 KV cache: the same logits but for summation order
    ours_logits = model(x)
    torch.testing.assert_close(peers["F32 kv-f32"](x), ours_logits, atol=1e-4, rtol=1e-4)
    # llama.cpp's default KV cache is fp16 even for an F32 file: that alone moves logits ~100x more
    f16_kv = (peers["F32"](x) - ours_logits).abs().max().item()
    f32_kv = (peers["F32 kv-f32"](x) - ours_logits).abs().max().item()
    assert f16_kv > 10 * f32_kv and f16_kv < 1e-2


@needs_llama_cpp
def test_llama_cpp_q8_perplexity_close_to_ours(draft, peers):
    model, tok = draft
    ids = encode(tok, read_slice("validation")[:20_000])
    ours = perplexity(model, ids, window=128, max_windows=3)
    assert perplexity(peers["F32"], ids, window=128, max_windows=3) == pytest.approx(ours, rel=1e-3)
    assert perplexity(peers["Q8_0"], ids, window=128, max_windows=3) == pytest.approx(ours, rel=0.02)


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_ours(draft, peers):
    from llmops_lab.quant.llama_cpp_peer import compare_tokenization
    _, tok = draft
    text = read_slice("validation")[:5_000] + " Ünïcode — 'tis 1601, isn't it?\n\n  two  spaces"
    assert compare_tokenization(peers["F32"], tok, text)["same"]


@needs_llama_cpp
def test_gguf_comparison_rows(tmp_path):
    from llmops_lab.quant.experiment import gguf_comparison
    rows = gguf_comparison("draft", formats=("F32",), out_dir=tmp_path, n_prompts=2, new_tokens=8, window=64,
                           max_windows=2, speed_prompt_len=8, speed_new_tokens=4, repeats=1, n_threads=1)
    assert [(r["runtime"], r["format"]) for r in rows] == [("ours", "fp32"), ("llama.cpp", "F32")]
    f32 = rows[1]
    assert f32["exact_prompts"] == 2 and f32["agreement"] == 1.0 and f32["tokenization_same"]
    assert f32["ppl_ratio"] == pytest.approx(1.0, rel=1e-3)
    assert f32["decode_tok_s"] > 0 and f32["file_bytes"] == (tmp_path / "draft-F32.gguf").stat().st_size


@needs_llama_cpp
def test_k_quant_by_llama_cpp_reads_back_within_the_bound(tmp_path):
    """Q4_K_M needs rows in multiples of 256: the target's (256, 768), not the draft's (192)."""
    from llmops_lab.quant.gguf import check_gguf, export_gguf, requantize
    model, tok = load_model("target", device="cpu"), load_tokenizer("target")
    path = requantize(export_gguf(model, tok, tmp_path / "f32.gguf"), tmp_path / "q4km.gguf", "Q4_K_M")
    report = check_gguf(path, model, tok)
    assert report["ok"], report["mismatches"]
    assert {r["type"] for r in report["tensors"]} == {"F32", "Q4_K", "Q6_K"}


@needs_llama_cpp
def test_requantize_refuses_its_own_source_and_says_why_llama_cpp_failed(exported, tmp_path):
    """requantize(p, p) killed the process (bus error) and left p truncated; a missing dst folder
    and a quantized source both failed with only "return code 1" (llama.cpp's log was silenced)."""
    import shutil

    from llmops_lab.quant.gguf import requantize
    src = shutil.copy(exported["F32"], tmp_path / "f32.gguf")
    size = src.stat().st_size
    with pytest.raises(ValueError, match="dst is src"):
        requantize(src, tmp_path / "." / "f32.gguf", "Q6_K")
    assert src.stat().st_size == size
    with pytest.raises(RuntimeError, match="requantizing from type q8_0 is disabled"):
        requantize(exported["Q8_0"], tmp_path / "o.gguf", "Q6_K")
    out = requantize(src, tmp_path / "new" / "dir" / "q6k.gguf", "Q6_K")   # the folder is made
    assert out.is_file()


def test_export_checks_its_arguments_before_touching_the_file(draft, exported, tmp_path, monkeypatch):
    """name=5 truncated an existing file and then raised "object of type 'int' has no len()";
    tokenizer=None raised AttributeError; a failure while writing left the target cut short."""
    import shutil

    import llmops_lab.quant.gguf as G
    model, tok = draft
    target = shutil.copy(exported["Q4_0"], tmp_path / "keep.gguf")
    before = target.read_bytes()
    with pytest.raises(TypeError, match="name"):
        G.export_gguf(model, tok, target, "F16", name=5)
    with pytest.raises(TypeError, match="tokenizer"):
        G.export_gguf(model, None, target, "F16")

    def boom(*a):
        raise RuntimeError("disk full")
    monkeypatch.setattr(G, "_quantize", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        G.export_gguf(model, tok, target, "F16")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gguf"]     # no temporary file left


def test_reading_a_cut_file_names_it(exported, tmp_path):
    """A truncated file raised "cannot reshape array of size N into shape (...)", a 100-byte one a
    numpy dtype error, neither saying which file or what is wrong with it."""
    from llmops_lab.quant.gguf import read_gguf, read_gguf_metadata
    data = exported["Q8_0"].read_bytes()
    for n in (len(data) // 2, 100):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        for read in (read_gguf, read_gguf_metadata):
            with pytest.raises(ValueError, match=f"cut{n}.gguf is not a complete GGUF file"):
                read(cut)


@needs_llama_cpp
def test_llama_cpp_generate_refuses_what_it_would_ignore(peers):
    """generate swallowed every other keyword: a left-padded prompt's attention_mask was dropped
    and the pads fed as tokens, top_k/pad_token_id ignored, max_new_tokens=-3 returned the prompt;
    a prompt past the context raised a numpy broadcast error and an id outside the vocabulary
    "llama_decode returned -1"."""
    peer = peers["Q8_0"]
    p = torch.tensor([[5, 17, 300, 42, 9]])
    plain = peer.generate(p, max_new_tokens=3, stop_token_ids=())
    assert torch.equal(peer.generate(p, max_new_tokens=3, stop_token_ids=(), attention_mask=torch.ones_like(p)), plain)
    padded, mask = torch.tensor([[0, 0, 5, 17, 300, 42, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="attention_mask must be all ones"):
        peer.generate(padded, attention_mask=mask, max_new_tokens=3)
    for kw in ("top_k", "pad_token_id", "generator"):
        with pytest.raises(TypeError, match=kw):
            peer.generate(p, max_new_tokens=3, **{kw: 5})
    for n in (-3, 0, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            peer.generate(p, max_new_tokens=n)
    too_long = torch.full((1, 257), 5)
    for run in (peer, peer.generate):
        with pytest.raises(ValueError, match="1 to 256 tokens"):
            run(too_long)
        for bad in (4096, -1):
            with pytest.raises(ValueError, match=r"\[0, 4096\)"):
                run(torch.tensor([[5, bad]]))


@pytest.mark.parametrize("qtype, largest_code", [("Q8_0", 127), ("Q4_0", 8)])
def test_bound_holds_for_blocks_whose_fp16_scale_is_subnormal(qtype, largest_code):
    """The block bound assumed a normal fp16 scale d: Q8_0 blocks with max |w| under 7.8e-3 (d =
    amax/127 under 2^-14) read back up to 1.02x the bound at std 2e-3 and 23x at std 2e-5, and
    check_gguf reported a correct export as failed. A subnormal d is off by up to half the
    subnormal spacing, 2^-24 / 2, times the largest |code|."""
    from llmops_lab.quant.gguf import _BLOCK_ABSOLUTE, error_bound
    assert np.finfo(np.float16).smallest_subnormal == 2.0 ** -24
    assert _BLOCK_ABSOLUTE[qtype] == largest_code * 2.0 ** -24 / 2
    rng = np.random.default_rng(0)
    amax = np.exp(rng.uniform(np.log(1e-9), np.log(1e-1), (2048, 1)))          # normal and subnormal d
    w = (rng.uniform(-1, 1, (2048, 32)) * amax).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    back = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
    ratio = np.abs(back - w) / error_bound(w, qtype)
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.9                                                   # and not loose


def test_bos_and_eos_are_written_as_the_tokenizer_and_model_use_them(draft, tmp_path):
    """add_bos_token was always true, and BOS/EOS ids came from the tokenizer object alone: a
    tokenizer that adds no BOS, or names none, passed check_gguf while llama.cpp put its own BOS
    (id 11 there, ")") before every prompt and stopped at it."""
    import json

    from transformers import PreTrainedTokenizerFast

    from llmops_lab.loader import embedded_model_path
    from llmops_lab.quant.gguf import check_gguf, export_gguf, read_gguf_metadata
    model, tok = draft
    tj = json.loads((embedded_model_path("draft") / "tokenizer.json").read_text())
    plain = dict(tj, post_processor=None)                      # GPT-2 style: no BOS added
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    no_bos = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "plain.json"), bos_token="<s>", eos_token="</s>")
    nameless = PreTrainedTokenizerFast(tokenizer_file=str(embedded_model_path("draft") / "tokenizer.json"))
    assert nameless.bos_token_id is None and nameless("a").input_ids[0] == model.config.bos_token_id
    for t, add_bos, bos, eos in ((tok, True, tok.bos_token_id, tok.eos_token_id), (no_bos, False, 0, 1),
                                 (nameless, True, model.config.bos_token_id, model.config.eos_token_ids[0])):
        path = export_gguf(model, t, tmp_path / "m.gguf", "F32")
        meta = read_gguf_metadata(path)
        assert (meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.bos_token_id"],
                meta["tokenizer.ggml.eos_token_id"]) == (add_bos, bos, eos)
        assert meta["tokenizer.ggml.add_eos_token"] is False
        assert check_gguf(path, model, t)["mismatches"] == []
    report = check_gguf(path, model, no_bos)                    # a file that says otherwise is caught
    assert "tokenizer.ggml.add_bos_token differs from the tokenizer's" in report["mismatches"]


@needs_llama_cpp
def test_llama_cpp_generate_at_the_context_gives_what_generate_gives(draft, peers):
    """It gave n_ctx - S tokens (none for a prompt of the whole context) and said nothing;
    LlamaModel.generate gives n_ctx - S + 1 and warns."""
    ids = torch.arange(3, 3 + 256)[None] % draft[0].config.vocab_size
    for S, want in ((250, 7), (256, 1)):
        with pytest.warns(UserWarning, match=f"truncated at the context: {want} new tokens, not 10"):
            out = peers["F32"].generate(ids[:, :S], max_new_tokens=10, stop_token_ids=())
        assert out.shape[1] - S == want
