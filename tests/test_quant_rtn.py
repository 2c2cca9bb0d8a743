"""Round-to-nearest quantization: packing, the error bound on every weight, QuantLinear, quantize()."""
import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmops_lab
from llmops_lab.config import ModelConfig
from llmops_lab.corpus import read_slice
from llmops_lab.evaluate import encode, perplexity
from llmops_lab.measure import module_bytes
from llmops_lab.model import LlamaModel
from llmops_lab.quant.packing import pack_bits, unpack_bits
from llmops_lab.quant import (QuantizedWeight, QuantLinear, check_error_bound, pack_codes, pack_int4,
                              quantize, quantize_rtn, unpack_codes, unpack_int4)

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=0, eos_token_id=1)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    m = LlamaModel(TINY)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    return m.eval()


def linear_bytes(model):
    return sum(module_bytes(m) for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, QuantLinear)) and n.rsplit(".", 1)[-1] in LINEARS)


# --- packing -----------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 5), half_cols=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_pack_int4_round_trip(rows, half_cols, seed):
    codes = torch.randint(0, 16, (rows, 2 * half_cols), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed).long(), codes)
    assert torch.equal(packed[:, 0] & 0x0F, codes[:, 0].to(torch.uint8))     # low nibble first


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pack_codes_round_trip_every_width(bits, sym, seed):
    # symmetric: all 2^b codes -2^(b-1)..2^(b-1)-1 (GPTQ's grid; round-to-nearest's leaves out the lowest)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    codes = torch.randint(lo, hi + 1, (3, 8), generator=torch.Generator().manual_seed(seed))
    codes[0, :2] = torch.tensor([lo, hi])
    stored = pack_codes(codes, bits, sym)
    assert stored.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert stored.numel() == 3 * bits                       # 8 codes a row: `bits` bytes, 8 at 8 bits
    assert torch.equal(unpack_codes(stored, bits, sym, K=8).long(), codes)


@pytest.mark.parametrize("bits, K", [(2, 3), (3, 3), (5, 3), (6, 3), (7, 7)])
def test_unpack_codes_without_k_refuses_a_row_padding_could_hide(bits, K):
    """unpack_codes without K read a row of 3 two-bit codes back as 4 ([[1, 2, 3]] -> [[1, 2, 3, 0]]):
    the byte's padding bits were taken for a code. Each case here has room for one more code."""
    codes = torch.arange(1, K + 1)[None]
    stored = pack_codes(codes, bits, sym=False)
    with pytest.raises(ValueError, match="pass K"):
        unpack_codes(stored, bits, sym=False)
    assert unpack_codes(stored, bits, sym=False, K=K).tolist() == codes.tolist()


def test_unpack_codes_without_k_at_4_and_8_bits():
    codes = torch.tensor([[1, 2, 3, 4]])
    for bits in (4, 8):                                      # whole pairs, whole bytes: no padding to misread
        assert unpack_codes(pack_codes(codes, bits, sym=False), bits, sym=False).tolist() == [[1, 2, 3, 4]]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), cols=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_bit_stream_round_trips_any_row_length(bits, rows, cols, seed):
    """pack_bits: ceil(cols*bits/8) bytes a row, whatever the row length; at 4 bits the same bytes
    as pack_int4 (the layout the kernel's nibble path reads)."""
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols * bits // 8))
    assert torch.equal(unpack_bits(packed, bits, cols).long(), codes)
    if bits == 4 and cols % 2 == 0:
        assert torch.equal(packed, pack_int4(codes))


def test_bit_stream_layout_by_hand():
    # three 3-bit codes 5 (101), 3 (011), 6 (110): stream bits 1,0,1, 1,1,0, 0,1,1 (low bit first)
    # -> byte 0 holds stream bits 0-7, bit 0 lowest: 0b10011101 = 157; byte 1 holds bit 8: 1
    assert pack_bits(torch.tensor([[5, 3, 6]]), 3).tolist() == [[157, 1]]
    with pytest.raises(ValueError, match="pass K"):
        unpack_codes(pack_codes(torch.tensor([[1, 2, 3]]), 3, sym=False), 3, sym=False)   # 2 bytes: 5 codes?
    assert unpack_codes(pack_codes(torch.tensor([[1, 2, 3]]), 3, sym=False), 3, sym=False, K=3).tolist() == [[1, 2, 3]]


def test_unpack_codes_refuses_8_bit_storage_other_than_int8():
    """At 8 bits the stored tensor was taken as it was: uint8 bytes decoded to other codes (0..255)
    and floats were truncated, with no error (an adversarial probe)."""
    codes = torch.tensor([[-3, 0, 5, 127]])
    stored = pack_codes(codes, 8, sym=True)
    assert unpack_codes(stored, 8, sym=True).tolist() == codes.tolist()
    for bad in (stored.view(torch.uint8), stored.float(), stored.to(torch.int16)):
        with pytest.raises(ValueError, match="8-bit codes are stored as torch.int8"):
            unpack_codes(bad, 8, sym=True)


def test_packing_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((1, 2), 16))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"lie in \[-8, 7\]"):
        pack_codes(torch.full((1, 2), -9), 4, sym=True)


@pytest.mark.parametrize("call", [
    lambda: unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 0, False),       # was ZeroDivisionError
    lambda: unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 9, False),
    lambda: pack_codes(torch.zeros(2, 4, dtype=torch.int8), True, True),
])
def test_packing_bad_bits(call):
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        call()


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=0), "group_size must be a positive int, got 0"),           # was ZeroDivisionError
    (dict(group_size=-1), "group_size must be a positive int"),
    (dict(group_size=True), "group_size must be a positive int, got True"),
    (dict(bits=4.0), "bits must be an int"),
])
def test_quantized_weight_bad_fields(kwargs, match):
    fields = dict(codes=torch.zeros(2, 4, dtype=torch.int8), scales=torch.ones(2, 1), zeros=torch.zeros(2, 1),
                  bits=4, group_size=4, sym=False)
    with pytest.raises(ValueError, match=match):
        QuantizedWeight(**{**fields, **kwargs})


# --- the error bound on every weight -------------------------------------------------------------

@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size,per_tensor", [(None, True), (None, False), (-1, False), (32, False)])
def test_error_bound_holds_on_every_weight(bits, sym, group_size, per_tensor):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[3, 5] = 0.9                                                   # an outlier widens one group
    before = w.clone()
    qw = quantize_rtn(w, bits, group_size, sym=sym, per_tensor=per_tensor)
    assert torch.equal(w, before)
    r = check_error_bound(w, qw, per_tensor=per_tensor)
    assert r["document_bound_holds"] and r["derived_bound_holds"] and r["violations"] == 0, r
    assert r["document_max_ratio"] <= 1 + 1e-3       # float32 rounding only (measured <= 1 + 7e-6)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    if per_tensor:
        assert qw.group_size == 96 and (qw.scales == qw.scales[0, 0]).all()


def test_document_bound_fails_for_one_signed_group_derived_bound_holds():
    # All weights of a group positive: the zero point needs 0 on the grid, so the range is
    # widened to [0, w_max] and the error can exceed (w_max - w_min)/(2^(b+1)-2).
    w = torch.tensor([[1.0, 1.1, 1.2, 1.3]])
    r = check_error_bound(w, quantize_rtn(w, bits=2))
    assert not r["document_bound_holds"] and r["violations"] > 0
    assert r["derived_bound_holds"]


def test_constant_and_zero_rows_do_not_divide_by_zero():
    w = torch.zeros(4, 8)
    w[1] = 0.5
    w[2] = -0.25
    for sym in (False, True):
        qw = quantize_rtn(w, bits=4, sym=sym)
        assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
        assert torch.allclose(qw.dequantize(), w, atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(group_size=0), "group_size"),
    (dict(group_size=24), "does not divide"), (dict(group_size=32, per_tensor=True), "per_tensor"),
])
def test_quantize_rtn_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_rtn(torch.randn(4, 64), **kwargs)


@pytest.mark.parametrize("w, sym", [
    (torch.tensor([[3e38, -3e38, 1.0, 2.0]]), False),      # max - min overflows float32: was all NaN
    (torch.tensor([[1e300, 1.0]], dtype=torch.float64), True),   # beyond float32 altogether
    (torch.tensor([[1e300, 1.0]], dtype=torch.float64), False),
])
def test_quantize_rtn_refuses_a_range_float32_cannot_hold(w, sym):
    with pytest.raises(ValueError, match="overflow to inf"):
        quantize_rtn(w, 8, sym=sym)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sym="no"), "sym must be True or False, got 'no'"), (dict(sym=None), "sym must be True or False"),
    (dict(per_tensor=1), "per_tensor must be True or False"),
])
def test_quantize_rtn_wants_real_bools(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_rtn(torch.randn(4, 64), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rtn_rejects_non_finite(bad):
    w = torch.randn(4, 64)
    w[2, 7] = bad
    before = w.clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_rtn(w)
    assert torch.equal(w.nan_to_num(), before.nan_to_num())


# --- QuantLinear ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (4, None, True), (8, None, False),
                                                 (8, 32, True), (3, 32, False), (2, None, True)])
@pytest.mark.parametrize("batch", [(1, 1), (3, 7)])
def test_quant_linear_matches_dequantized_reference(bits, group_size, sym, batch):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    qw = quantize_rtn(lin.weight.detach(), bits, group_size, sym=sym)
    x = torch.randn(*batch, 96, generator=g)
    exact = QuantLinear.from_linear(lin, qw, scale_dtype=torch.float32)
    ref = x @ qw.dequantize().T + lin.bias.detach()
    assert torch.allclose(exact(x), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(exact.quantized_weight().codes.long(), qw.codes.long())
    half = QuantLinear.from_linear(lin, qw)                         # fp16 scales: default storage
    assert half.scales.dtype == torch.float16
    assert (half(x) - ref).abs().max() < 1e-2 * ref.abs().max()


def weights_of_std(std, bits):
    """A bias-free linear whose weights have std ``std`` (a float output to compare with)."""
    lin = torch.nn.Linear(64, 8, bias=False)
    torch.nn.init.normal_(lin.weight, std=std, generator=torch.Generator().manual_seed(0))
    return lin, quantize_rtn(lin.weight.detach(), bits)


@pytest.mark.parametrize("std, bits, match", [
    (1e-7, 8, "underflow to 0 in torch.float16; pass scale_dtype=torch.float32"),   # was all-zero output
    (3e5, 4, "overflow torch.float16.*pass scale_dtype=torch.float32"),             # was NaN output
])
def test_quant_linear_refuses_scales_fp16_cannot_hold(std, bits, match):
    lin, qw = weights_of_std(std, bits)
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_linear(lin, qw)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = x @ qw.dequantize().T
    out = QuantLinear.from_linear(lin, qw, scale_dtype=torch.float32)(x)          # the suggested fix works
    assert torch.isfinite(out).all() and ref.abs().max() > 0
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_quant_linear_checks_zero_points_too():
    qw = quantize_rtn(torch.randn(2, 8), 4)
    qw.zeros[0, 0] = 1e6                                      # not an RTN zero point, but fp16 cannot hold it
    with pytest.raises(ValueError, match=r"zero points up to 1e\+06 overflow torch.float16"):
        QuantLinear(qw)


@pytest.mark.parametrize("scale_dtype", [torch.int8, torch.int32, torch.bool, "float16", None])
def test_quant_linear_refuses_a_non_float_scale_dtype(scale_dtype):
    qw = quantize_rtn(torch.randn(4, 8), 8)                    # int8 scales used to give all-zero outputs
    with pytest.raises(ValueError, match="scale_dtype must be a floating-point torch.dtype"):
        QuantLinear(qw, scale_dtype=scale_dtype)


def test_quant_linear_storage_shrinks():
    lin = torch.nn.Linear(256, 128, bias=False)
    q4 = QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), 4, 128))
    q8 = QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), 8))
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (128, 128)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.shape == (128, 256)
    fp32 = module_bytes(lin)
    assert q4.nbytes == module_bytes(q4) == 128 * 128 + 2 * 128 * 2 * 2
    assert q8.nbytes == 128 * 256 + 2 * 128 * 2
    assert q4.nbytes / fp32 < 0.14 and q8.nbytes / fp32 < 0.26


# --- quantize() on a model --------------------------------------------------------------------------

@torch.no_grad()
def test_quantize_tiny_model_8bit_logits_close_and_bytes_shrink():
    m = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = m(ids)
    fp32_bytes = linear_bytes(m)
    q8 = quantize(copy.deepcopy(m), bits=8, group_size=None, progress=False)
    rel = (q8(ids) - ref).norm() / ref.norm()
    assert rel < 0.01, rel
    assert isinstance(q8.model.layers[0].self_attn.q_proj, QuantLinear)
    assert type(q8.lm_head) is torch.nn.Linear                       # skipped by default
    q4 = quantize(copy.deepcopy(m), bits=4, group_size=32, progress=False)
    ratio4 = linear_bytes(q4) / fp32_bytes
    assert ratio4 == pytest.approx(1 / 8 + (2 + 2) / (32 * 4)), ratio4  # codes + fp16 scale, zero per 32
    assert linear_bytes(q8) / fp32_bytes < 0.27               # + fp16 scale, zero per row of 64 or 160
    assert q4.device.type == "cpu" and q4.dtype == torch.float32


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bits=9), ValueError, "bits"), (dict(group_size=48), ValueError, "does not divide"),
    (dict(method="hqq"), ValueError, "rtn"), (dict(sym=True, damp_percent=0.1), ValueError, "damp_percent"),
    (dict(sym=None), ValueError, "sym must be True or False, got None"),
    (dict(sym="no"), ValueError, "sym must be True or False, got 'no'"),
    (dict(bits=True), ValueError, "bits must be an int"), (dict(group_size=True), ValueError, "group_size"),
    (dict(scale_dtype=torch.int8), ValueError, "scale_dtype must be a floating-point"),
])
def test_quantize_bad_input_leaves_model_untouched(kwargs, error, match):
    m = tiny_model()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        quantize(m, progress=False, **{"group_size": 32, **kwargs})
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_quantize_takes_numpy_ints():
    """bits=np.int64(4) was refused as "bits must be an int in 2..8, got np.int64(4)": the quant
    modules had their own is_int, narrower than llmops_lab.checks'."""
    m = tiny_model()
    want = quantize(copy.deepcopy(m), bits=4, group_size=32, progress=False)
    got = quantize(m, bits=np.int64(4), group_size=np.int32(32), progress=False)
    ref = want.state_dict()
    assert got.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) if isinstance(v, torch.Tensor) else v == ref[k]    # + format dicts
               for k, v in got.state_dict().items())
    q = got.model.layers[0].self_attn.q_proj
    assert type(q.bits) is int and type(q.group_size) is int                 # stored as Python ints
    qw = quantize_rtn(torch.randn(4, 8), bits=np.int8(3), group_size=np.int64(4))
    assert (type(qw.bits), type(qw.group_size)) == (int, int)
    with pytest.raises(ValueError, match="bits must be an int"):           # a bool is still no width
        quantize_rtn(torch.randn(4, 8), bits=np.bool_(True))


def test_quantize_nan_in_last_layer_leaves_model_untouched():
    m = tiny_model()
    with torch.no_grad():
        m.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="down_proj.*NaN"):
        quantize(m, group_size=32, progress=False)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())


@pytest.mark.parametrize("factor, bits, match", [(1e-6, 8, "underflow"), (1e7, 4, "overflow")])
def test_quantize_scales_fp16_cannot_hold_leave_model_untouched(factor, bits, match):
    m = tiny_model()
    with torch.no_grad():
        m.model.layers[-1].mlp.down_proj.weight *= factor      # the last linear quantized: the others pass
    modules = dict(m.named_modules())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=f"down_proj: .*{match}.*scale_dtype=torch.float32"):
        quantize(m, bits=bits, group_size=None, progress=False)
    assert dict(m.named_modules()) == modules                  # the same module objects, none swapped
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    q = quantize(m, bits=bits, group_size=None, progress=False, scale_dtype=torch.float32)
    assert isinstance(q.model.layers[-1].mlp.down_proj, QuantLinear)


# --- the embedded target: perplexity ----------------------------------------------------------------

@pytest.fixture(scope="module")
def target_and_ids():
    model = llmops_lab.load_model("target", device="cpu")
    ids = encode(llmops_lab.load_tokenizer("target"), read_slice("validation"))[: 4 * 256 + 1]
    return model, ids, perplexity(model, ids, window=256, max_windows=4)


@pytest.mark.parametrize("kwargs,tolerance", [
    (dict(bits=8, group_size=None), 0.02),        # measured: +0.0% (42.82 vs 42.83 fp32)
    (dict(bits=4, group_size=128), 0.05),         # measured: +0.1% (42.87)
])
def test_target_perplexity_after_rtn(target_and_ids, kwargs, tolerance):
    model, ids, fp32 = target_and_ids
    q = quantize(copy.deepcopy(model), progress=False, **kwargs)
    ppl = perplexity(q, ids, window=256, max_windows=4)
    assert abs(ppl / fp32 - 1) < tolerance, (fp32, ppl)


def test_quant_linear_refuses_a_bias_of_the_wrong_shape():
    """A bias of 5 for 8 outputs was accepted; forward then failed inside torch's broadcast."""
    qw = quantize_rtn(torch.randn(8, 32), bits=4, group_size=16, scale_dtype=torch.float16)
    for bad, got in ((torch.zeros(5), r"\(5,\)"), (torch.zeros(8, 1), r"\(8, 1\)"), ([0.0] * 8, "list")):
        with pytest.raises(ValueError, match=rf"bias must be a tensor of shape \(8,\), got {got}"):
            QuantLinear(qw, bias=bad)
    assert QuantLinear(qw, bias=torch.ones(8))(torch.zeros(2, 32)).tolist() == [[1.0] * 8] * 2


def test_quant_linear_rejects_odd_in_features_at_4_bits():
    qw = quantize_rtn(torch.randn(4, 7), bits=4)
    with pytest.raises(ValueError, match="even in_features"):
        QuantLinear(qw)
    qw3 = quantize_rtn(torch.randn(4, 7), bits=3)
    q3 = QuantLinear(qw3)                           # 7 codes of 3 bits: 21 bits, 3 bytes a row
    assert q3.qweight.shape == (4, 3)
    assert torch.equal(q3.quantized_weight().codes.long(), qw3.codes.long())
    assert torch.allclose(q3.dequantize(), qw3.dequantize(), atol=1e-3)


# --- scales as stored: chosen against, kept through casts ---------------------------------------

def test_codes_are_chosen_against_the_stored_fp16_scales():
    """quantize() stored fp16 scales but chose the codes against the float32 ones: 8-bit layers of
    weights with std 0.01 missed the half-step bound check_error_bound reports by 7%, std 0.001 by 60%."""
    lin = torch.nn.Linear(128, 64, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=torch.Generator().manual_seed(0))
    w = lin.weight.detach().clone()
    model = torch.nn.Sequential(lin)
    q = quantize(model, bits=8, group_size=32, skip=(), progress=False)[0]
    assert q.scales.dtype == torch.float16
    r = check_error_bound(w, q.quantized_weight())
    assert r["derived_bound_holds"], r
    assert r["derived_max_ratio"] <= 1.0 and r["derived_max_ratio"] > 0.99    # the bound is tight
    qw = quantize_rtn(w, 8, 32, scale_dtype=torch.float16)                  # the same, directly
    assert qw.scales.dtype == torch.float16 and torch.equal(qw.scales, q.scales)
    assert check_error_bound(w, qw)["derived_bound_holds"]


def test_scales_rounded_after_the_codes_warn():
    lin = torch.nn.Linear(128, 64, bias=False)
    qw = quantize_rtn(lin.weight.detach(), 8, 32)                            # float32 scales
    with pytest.warns(UserWarning, match="after the codes were chosen.*scale_dtype=torch.float16"):
        QuantLinear(qw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QuantLinear(quantize_rtn(lin.weight.detach(), 8, 32, scale_dtype=torch.float16))
        QuantLinear(qw, scale_dtype=torch.float32)


@pytest.mark.parametrize("std, bits, fits", [(1e-3, 8, False), (1e-4, 4, False), (1e-3, 4, True)])
def test_subnormal_fp16_scales_that_break_the_bound_are_refused(std, bits, fits):
    """fp16 scales under 6.1e-5 are subnormal: spaced 6e-8 apart, so rounding one up can grow the
    step past the bound (std 1e-4 at 8 bits: 7.3x the half step, with codes chosen in float32)."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * std
    if not fits:
        with pytest.raises(ValueError, match="underflow torch.float16's normal range.*scale_dtype=torch.float32"):
            quantize_rtn(w, bits, 32, scale_dtype=torch.float16)
        qw = quantize_rtn(w, bits, 32, scale_dtype=torch.float32)            # the suggested fix
    else:
        qw = quantize_rtn(w, bits, 32, scale_dtype=torch.float16)
    assert check_error_bound(w, QuantLinear(qw, scale_dtype=qw.scales.dtype).quantized_weight())["derived_bound_holds"]


@pytest.mark.parametrize("bits, std, scale_dtype", [(8, 0.08, torch.float16), (4, 1e-6, torch.float32)])
def test_casting_a_quantized_model_keeps_scales_and_zeros(bits, std, scale_dtype):
    """.half() / .to(bfloat16) re-cast the scales unchecked: fp16 scales became bf16 (8 bits: the
    error past the half step went from 1.08x to 1.65x), and fp32 scales of tiny weights flushed to 0
    in fp16, zeroing the layer."""
    m = tiny_model()
    with torch.no_grad():
        for p in m.model.parameters():
            p.mul_(std / 0.08)
    quantize(m, bits=bits, group_size=32, scale_dtype=scale_dtype, progress=False)
    layers = {n: q for n, q in m.named_modules() if isinstance(q, QuantLinear)}
    before = {n: q.dequantize(torch.float64) for n, q in layers.items()}
    for cast in (lambda x: x.half(), lambda x: x.to(torch.bfloat16), lambda x: x.float(), lambda x: x.double()):
        cast(m)
        for n, q in layers.items():
            assert q.scales.dtype == q.zeros.dtype == scale_dtype, n
            assert torch.equal(q.dequantize(torch.float64), before[n]), n
    assert all(q.dtype == torch.float64 for q in layers.values())         # the compute dtype follows
    m.to("meta")                                                            # a device move still moves them
    assert all(q.scales.device.type == q.zeros.device.type == q.qweight.device.type == "meta"
               and q.scales.dtype == scale_dtype for q in layers.values())


def test_a_second_rtn_pass_says_already_quantized():
    m = quantize(tiny_model(), bits=8, group_size=32, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(m, bits=8, group_size=32, progress=False)
