"""quantize(model, method=...): GPTQ and AWQ routed through the one entry point give the same model
as calling them directly, configs come from objects or field names, and every bad input (bits,
group size, NaN weights, empty or too short calibration, wrong config) leaves the model untouched."""
import copy

import numpy as np
import pytest
import torch

import llmops_lab
from llmops_lab.quant import (AWQConfig, GPTQConfig, QuantLinear, as_calibration_ids, awq_quantize_model,
                              embedded_calibration, gptq_quantize_model, quantize)
from llmops_lab.quant.gptq import LINEAR_NAMES


@pytest.fixture(scope="module")
def small():
    """The embedded target cut to its first two decoder layers (fast to calibrate)."""
    m = llmops_lab.load_model("target", device="cpu")
    m.model.layers = m.model.layers[:2]
    return m


@pytest.fixture(scope="module")
def calib():
    return embedded_calibration(4, 64)                                 # [4, 64]


IDS = torch.randint(3, 4096, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("method, config, direct", [
    ("gptq", GPTQConfig(bits=4, group_size=64), gptq_quantize_model),
    ("awq", AWQConfig(w_bit=4, q_group_size=64), awq_quantize_model),
])
def test_routing_matches_the_direct_call(small, calib, method, config, direct):
    routed = quantize(copy.deepcopy(small), method, config=config, calibration=calib, progress=False,
                      scale_dtype=torch.float32)
    ref = copy.deepcopy(small)
    direct(ref, calib, config, progress=False, apply=True)               # dequantized weights in place
    layer = routed.model.layers[1]
    assert all(isinstance(layer.get_submodule(n), QuantLinear) for n in LINEAR_NAMES)
    assert type(routed.lm_head) is torch.nn.Linear
    assert torch.allclose(routed(IDS), ref(IDS), atol=1e-4, rtol=1e-4)


def test_generic_arguments_fill_the_method_config(small, calib):
    m = quantize(copy.deepcopy(small), "awq", bits=3, group_size=None, sym=True, calibration=calib, progress=False)
    q = m.model.layers[0].mlp.down_proj
    assert (q.bits, q.group_size, q.sym) == (3, q.in_features, True)     # w_bit, q_group_size=-1, zero_point
    m = quantize(copy.deepcopy(small), "gptq", damp_percent=0.05, desc_act=True, group_size=128,
                 calibration=list(calib), progress=False)              # a list of 1-D sequences works too
    q = m.model.layers[1].self_attn.o_proj
    assert (q.bits, q.group_size, q.sym) == (4, 128, True)               # GPTQConfig's defaults


def test_calibration_helpers():
    assert embedded_calibration().shape == (8, 128)
    seqs = [torch.arange(10), torch.arange(7), torch.arange(12)]
    assert as_calibration_ids(seqs).shape == (3, 7)                      # cut to the shortest
    two_d = torch.arange(20).reshape(2, 10)      # in a list it was flattened into one 20-token sequence
    for bad in ([two_d], [1, 2, 3], "some text"):
        with pytest.raises(ValueError, match="calibration"):
            as_calibration_ids(bad)
    assert torch.equal(as_calibration_ids(two_d), two_d)


@pytest.mark.parametrize("method, kwargs, match", [
    ("gptq", dict(bits=9), "bits"),
    ("awq", dict(bits=1), "w_bit"),
    ("gptq", dict(group_size=48), "does not divide"),
    ("awq", dict(group_size=48), "does not divide"),
    ("gptq", dict(calibration=[]), "empty"),
    ("awq", dict(calibration=torch.zeros(0, 16, dtype=torch.long)), "empty"),
    ("gptq", dict(calibration=torch.zeros(3, 1, dtype=torch.long)), "at least 2 tokens"),
    ("awq", dict(calibration=[torch.tensor([5])]), "at least 2 tokens"),
    ("gptq", dict(config=AWQConfig()), "takes a GPTQConfig"),
    ("awq", dict(config=AWQConfig(), w_bit=3), "not both"),
    ("gptq", dict(w_bit=3), "bad GPTQConfig field"),
    ("bnb_int8", dict(bits=8), "do not apply"),
    ("rtn", dict(calibration=[torch.arange(8)]), "no config or calibration"),
    ("nf4", {}, "method in"),
    ("gptq", dict(sym="no"), "sym must be True or False, got 'no'"),
    ("awq", dict(sym=None), "sym must be True or False, got None"),     # was zero_point=True
    ("awq", dict(zero_point="no"), "zero_point must be True or False"),
    ("gptq", dict(desc_act=1), "desc_act must be True or False"),
    ("gptq", dict(group_size=True), "group_size must be a positive int or -1"),
    ("awq", dict(bits=True), "w_bit must be an int"),
    ("gptq", dict(scale_dtype=torch.int8), "scale_dtype must be a floating-point"),
    ("gptq", dict(calibration=torch.zeros(2, 16)), "integer token ids, got dtype torch.float32"),
    ("awq", dict(calibration=[torch.arange(16.0), torch.arange(16.0)]), "integer token ids"),
])
def test_bad_input_leaves_model_untouched(small, method, kwargs, match):
    m = copy.deepcopy(small)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        quantize(m, method, progress=False, **{"calibration": embedded_calibration(2, 16), **kwargs}
                 if method in ("gptq", "awq") else kwargs)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert state.keys() == m.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("make, match", [
    (lambda: GPTQConfig(sym="no"), "sym must be True or False, got 'no'"),
    (lambda: GPTQConfig(desc_act="yes"), "desc_act must be True or False"),
    (lambda: GPTQConfig(group_size=True), "group_size must be a positive int or -1"),
    (lambda: GPTQConfig(bits=True), "bits must be an int"),
    (lambda: GPTQConfig(block_size=True), "block_size must be a positive int"),
    (lambda: GPTQConfig(damp_percent="0.01"), "damp_percent must be a number"),
    (lambda: AWQConfig(zero_point="no"), "zero_point must be True or False, got 'no'"),
    (lambda: AWQConfig(q_group_size=False), "q_group_size must be a positive int or -1"),
    (lambda: AWQConfig(w_bit=True), "w_bit must be an int"),
])
def test_configs_want_real_bools_and_ints(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_take_numpy_ints_and_store_python_ints():
    """GPTQConfig(bits=np.int64(4)) was refused as "bits must be an int in 2..8, got np.int64(4)"."""
    g = GPTQConfig(bits=np.int64(4), group_size=np.int32(64), block_size=np.int64(32))
    a = AWQConfig(w_bit=np.int64(4), q_group_size=np.int16(-1))
    assert (g, a) == (GPTQConfig(bits=4, group_size=64, block_size=32), AWQConfig(w_bit=4, q_group_size=-1))
    assert all(type(v) is int for v in (g.bits, g.group_size, g.block_size, a.w_bit, a.q_group_size))


@pytest.mark.parametrize("direct", [gptq_quantize_model, awq_quantize_model])
def test_float_calibration_ids_are_refused(small, direct):
    with pytest.raises(ValueError, match="calibration_ids must be integer token ids"):
        direct(copy.deepcopy(small), embedded_calibration(2, 16).float(), progress=False)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_scales_fp16_cannot_hold_leave_model_untouched(small, method):
    """Tiny weights in the last layer: their fp16 scales would be 0. AWQ has folded its scales into
    layer 0 by then; the refusal must undo that too."""
    m = copy.deepcopy(small)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight *= 1e-6
    modules = dict(m.named_modules())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: .*underflow.*scale_dtype=torch\.float32"):
        quantize(m, method, calibration=embedded_calibration(2, 16), progress=False)
    assert dict(m.named_modules()) == modules                  # the same module objects, none swapped
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_nan_weight_leaves_model_untouched(small, method):
    m = copy.deepcopy(small)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 3] = float("inf")
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(m, method, calibration=embedded_calibration(2, 16) if method != "rtn" else None, progress=False)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())     # inf == inf


def test_skip_takes_dotted_names_and_refuses_a_bare_string(small):
    """A dotted name in skip was silently ignored (only single name parts matched), and a bare
    string was tested letter by letter (found by an adversarial probe)."""
    m = copy.deepcopy(small)
    quantize(m, "rtn", bits=8, skip=("lm_head", "layers.0.mlp.down_proj"), progress=False)
    assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear) and type(m.lm_head) is torch.nn.Linear
    fresh = copy.deepcopy(small)
    with pytest.raises(TypeError, match="skip"):
        quantize(fresh, "rtn", bits=8, skip="mlp.gate_proj", progress=False)
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())
    # a dotted run of parts names every linear inside that module ("layers.1.mlp" skipped nothing)
    m = copy.deepcopy(small)
    quantize(m, "rtn", bits=8, skip=("lm_head", "layers.1.mlp", "self_attn.o_proj"), progress=False)
    assert all(type(lin) is torch.nn.Linear for lin in m.model.layers[1].mlp.children())
    assert isinstance(m.model.layers[0].mlp.up_proj, QuantLinear)
    assert all(type(layer.self_attn.o_proj) is torch.nn.Linear for layer in m.model.layers)
    assert isinstance(m.model.layers[1].self_attn.q_proj, QuantLinear)
    # an entry that names no module (a typo) is refused, the model untouched
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError, match="name no module"):
            quantize(fresh, method, bits=4, skip=("lm_head", "layers.9.mlp"), progress=False)
    with pytest.raises(ValueError, match=r"\['mpl'\] name no module"):
        quantize(fresh, "rtn", bits=8, skip=("mpl",), progress=False)
    with pytest.raises(ValueError, match="has no submodules"):      # was an IndexError
        quantize(torch.nn.Linear(16, 16), "rtn", bits=8, skip=("x",), progress=False)
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())


def _tiny_quantized(**kw):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    return quantize(m, skip=(), progress=False, **kw)


@pytest.mark.parametrize("other", [dict(sym=True), dict(group_size=16), dict(scale_dtype=torch.float32)])
def test_state_dict_carries_the_format_and_a_mismatch_is_refused(other):
    """A symmetric and an asymmetric 4-bit layer store tensors of the same shapes and dtypes: the state
    dict names its format, and loading it into a layer of another format is an error, not a silently
    wrong layer."""
    fmt = dict(bits=4, group_size=32, sym=False)
    a = _tiny_quantized(**fmt)
    state = a.state_dict()
    assert state["0._extra_state"] == {"bits": 4, "group_size": 32, "sym": False, "in_features": 64,
                                       "out_features": 32, "scale_dtype": "float16"}
    same = _tiny_quantized(**fmt)
    same.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(same(x), a(x))
    b = _tiny_quantized(**{**fmt, **other})
    before = {k: v.clone() for k, v in b.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="another quantization format"):
        b.load_state_dict(state, strict=False)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items() if torch.is_tensor(v))
    no_format = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    with pytest.raises(RuntimeError, match="no quantization format"):
        same.load_state_dict(no_format, strict=False)


def test_float_only_tools_refuse_a_quantized_model(small, tmp_path):
    from llmops_lab.loader import save_model
    from llmops_lab.peers import hf_twin
    from llmops_lab.quant import export_gguf
    q = quantize(copy.deepcopy(small), progress=False)
    with pytest.raises(ValueError, match="save_model takes a float model"):
        save_model(q, tmp_path / "q")
    assert not (tmp_path / "q" / "config.json").exists()
    with pytest.raises(ValueError, match="hf_twin takes a float model"):
        hf_twin(q)
    with pytest.raises(ValueError, match="export_gguf takes a float model"):
        export_gguf(q, llmops_lab.load_tokenizer("target"), tmp_path / "q.gguf")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_refuse_a_partly_quantized_model(small, calib, method):
    """A QuantLinear's .weight is a dequantized copy: GPTQ wrote its updates into that temporary and
    re-quantized the int8 codes to int4 (AWQ failed on the state's format entry). RTN may still
    quantize the layers an earlier pass skipped."""
    part = quantize(copy.deepcopy(small), "rtn", bits=8, skip=("lm_head", "mlp"), progress=False)
    with pytest.raises(ValueError, match="takes a float model"):
        quantize(part, method, calibration=calib, progress=False)
    direct = gptq_quantize_model if method == "gptq" else awq_quantize_model
    with pytest.raises(ValueError, match="takes a float model"):
        direct(part, calib, GPTQConfig() if method == "gptq" else AWQConfig(), progress=False)
    quantize(part, "rtn", skip=("lm_head",), progress=False)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in part.named_modules() if "layers" in n)


# --- skip during calibration ---------------------------------------------------------------------

def _odd_mlp_model(random_llama):
    """Two layers whose down_proj takes 96 inputs: group_size 64 fits every linear but that one."""
    from llmops_lab.config import ModelConfig
    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return random_llama(cfg)


CAL = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_honour_skip_for_a_layer_the_group_does_not_fit(random_llama, method):
    """RTN could skip a linear its group size does not divide; GPTQ and AWQ checked every decoder
    linear, skipped or not, and refused with an error that named no layer."""
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: group_size 64 does not divide"):
        quantize(_odd_mlp_model(random_llama), method, group_size=64, calibration=CAL, progress=False)
    m = quantize(_odd_mlp_model(random_llama), method, group_size=64, calibration=CAL, progress=False,
                 skip=("lm_head", "down_proj"))
    for layer in m.model.layers:
        assert type(layer.mlp.down_proj) is torch.nn.Linear
        assert all(isinstance(layer.get_submodule(n), QuantLinear) for n in LINEAR_NAMES if n != "mlp.down_proj")


@torch.no_grad()
def test_gptq_keeps_skipped_linears_float_while_calibrating(random_llama):
    """Skipped linears were quantized during the sequential run (and put back after), so layer 1 was
    calibrated on what a quantized layer-0 MLP computes, which the final model never does."""
    from llmops_lab.quant.gptq import LINEAR_SETS, HessianAccumulator, LayerRunner, gptq_quantize_weight
    config = GPTQConfig(bits=3, group_size=32)
    model = _odd_mlp_model(random_llama)
    got = gptq_quantize_model(copy.deepcopy(model), CAL, config, progress=False, skip=("mlp",))
    assert sorted(got) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES[:4])
    # the run by hand: layer 0's attention quantized, its MLP float, then layer 1's q_proj
    ref = copy.deepcopy(model)
    runner = LayerRunner(ref, CAL)
    layer0, layer1 = ref.model.layers
    for names in LINEAR_SETS[:2]:
        acc = {n: HessianAccumulator(layer0.get_submodule(n).in_features) for n in names}
        runner.capture(layer0, names, lambda n, x: acc[n].add_batch(x))
        for n in names:
            lin = layer0.get_submodule(n)
            lin.weight.copy_(gptq_quantize_weight(lin.weight, acc[n].H, config).dequantize())
    runner.x = runner.run(layer0)
    acc = HessianAccumulator(64)
    runner.capture(layer1, ["self_attn.q_proj"], lambda n, x: acc.add_batch(x))
    want = gptq_quantize_weight(layer1.self_attn.q_proj.weight, acc.H, config)
    assert torch.equal(got["model.layers.1.self_attn.q_proj"].codes, want.codes)


@torch.no_grad()
def test_awq_skipped_linears_stay_float_and_the_function_is_kept(random_llama):
    model = _odd_mlp_model(random_llama)
    ref = model(CAL)
    folded = copy.deepcopy(model)
    skip = ("self_attn.v_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj")   # a whole set, and half
    got = awq_quantize_model(folded, CAL, AWQConfig(q_group_size=32), progress=False, apply=False, skip=skip)
    assert "model.layers.0.self_attn.v_proj" not in got and "model.layers.0.mlp.down_proj" in got
    assert "model.layers.1.mlp.up_proj" not in got and "model.layers.1.mlp.down_proj" in got
    assert torch.allclose(folded(CAL), ref, atol=1e-4)        # scales folded into skipped linears too
    q = quantize(copy.deepcopy(model), "awq", group_size=32, calibration=CAL, progress=False,
                 skip=("lm_head",) + skip)
    assert type(q.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    assert type(q.model.layers[1].mlp.gate_proj) is torch.nn.Linear
    assert isinstance(q.model.layers[1].self_attn.o_proj, QuantLinear)
