"""A checkpoint's bad values are clear errors naming the field and the file, before a model is built:
config.json fields of the wrong type, token ids, RoPE scaling, Qwen2's window, safetensors files
that disagree, and what the CLI prints for each."""
import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmops_lab
from llmops_lab import cli
from llmops_lab.config import ModelConfig
from llmops_lab.loader import DATA_DIR
from llmops_lab.model import LlamaModel

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=0, eos_token_id=1)
IDS = torch.tensor([[3, 9, 4, 17, 22, 5, 8, 41, 2, 30, 11, 7]])


def checkpoint(folder, config=SMALL):
    torch.manual_seed(0)
    m = LlamaModel(config).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    llmops_lab.save_model(m, folder)
    return m


def load(folder):
    return llmops_lab.load_model(folder, device="cpu")


def edit_config(folder, **fields):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field, value", [
    ("eos_token_id", [64]), ("eos_token_id", 64), ("eos_token_id", -1), ("eos_token_id", True),
    ("eos_token_id", "1"), ("eos_token_id", [1, None]), ("eos_token_id", 2.0), ("bos_token_id", 64),
    ("bos_token_id", False), ("bos_token_id", [0]),
])
def test_token_ids_are_in_the_vocabulary(field, value):
    """eos_token_id [64] with a vocabulary of 64 loaded, then crashed the serving engine."""
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), field: value})
    ok = ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), "eos_token_id": [1, 63], "bos_token_id": None})
    assert ok.eos_token_ids == (1, 63) and ok.bos_token_id is None


def test_qwen2_sliding_window_survives_save_and_load(tmp_path):
    """to_hf_dict wrote sliding_window without use_sliding_window, so the window was dropped on load;
    transformers reads the written config as the same window on every layer."""
    from transformers import AutoModelForCausalLM
    config = dataclasses.replace(SMALL, model_type="qwen2", attention_bias=True, sliding_window=4)
    m = checkpoint(tmp_path, config)
    back = load(tmp_path)
    assert back.config == config and back.config.sliding_window == 4
    with torch.no_grad():
        assert torch.equal(back(IDS), m(IDS))
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert theirs.config.layer_types == ["sliding_attention"] * 2
        assert (theirs(IDS).logits - m(IDS)).abs().max() < 1e-4


@pytest.mark.parametrize("fields, window", [
    ({"use_sliding_window": False}, None),
    ({"max_window_layers": 2}, None),                  # no layer from 2 on: transformers windows none
    ({"max_window_layers": None}, "max_window_layers"),
    ({"max_window_layers": 1}, "some layers"),         # layer 1 windowed, layer 0 not
    ({"layer_types": ["sliding_attention"] * 2}, 4),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "some layers"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"use_sliding_window": "true"}, "use_sliding_window"),
])
def test_qwen2_window_is_read_as_transformers_reads_it(fields, window):
    d = dataclasses.replace(SMALL, model_type="qwen2", attention_bias=True, sliding_window=4).to_hf_dict()
    d.pop("max_window_layers")
    d.update(fields)
    if isinstance(window, str):
        with pytest.raises(ValueError, match=window):
            ModelConfig.from_hf_dict(d)
    else:
        assert ModelConfig.from_hf_dict(d).sliding_window == window


def test_mistral_window_defaults_as_in_transformers():
    """transformers' MistralConfig reads a missing sliding_window as 4096, so to_hf_dict writes null."""
    d = dataclasses.replace(SMALL, model_type="mistral").to_hf_dict()
    assert d["sliding_window"] is None and ModelConfig.from_hf_dict(d).sliding_window is None
    d.pop("sliding_window")
    assert ModelConfig.from_hf_dict(d).sliding_window == 4096


def test_absent_keys_read_as_transformers_reads_them():
    """A config.json without rms_norm_eps read 1e-5 for Llama and Mistral where transformers reads
    1e-6 (logits 0.8 apart on a small-norm model); without max_position_embeddings, Mistral and
    Qwen2 read 2048 where transformers reads 131072 and 32768."""
    d = SMALL.to_hf_dict()
    for key in ("rms_norm_eps", "max_position_embeddings"):
        d.pop(key)
    for kind, context in (("llama", 2048), ("mistral", 131072), ("qwen2", 32768)):
        c = ModelConfig.from_hf_dict({**d, "model_type": kind})
        assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == context, kind


def test_llama_biases_this_runtime_lacks_are_refused_by_name():
    """Llama's attention_bias puts a bias on o_proj too, and mlp_bias on the MLP: neither exists
    here, and loading failed later with "unexpected ['...o_proj.bias']"."""
    with pytest.raises(ValueError, match="o_proj"):
        ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), "attention_bias": True})
    with pytest.raises(ValueError, match="mlp_bias"):
        ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), "mlp_bias": True})
    qwen = dataclasses.replace(SMALL, model_type="qwen2", attention_bias=True).to_hf_dict()
    assert ModelConfig.from_hf_dict(qwen).attention_bias       # Qwen2's q/k/v biases are supported


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_rope_scaling_without_a_type_is_refused(where):
    """{"factor": 4.0} was read as the default RoPE: the factor was dropped without a word."""
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), where: {"factor": 4.0}})
    with pytest.raises(ValueError, match="rope_type"):
        dataclasses.replace(SMALL, rope_scaling={"factor": 4.0})
    assert ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), where: {"rope_type": "default"}}).rope_scaling is None


@pytest.mark.parametrize("field, value", [
    ("tie_word_embeddings", "false"), ("attention_bias", "false"), ("attention_bias", 1),
    ("num_key_value_heads", 0), ("rms_norm_eps", True), ("rope_theta", True), ("sliding_window", True),
    ("rope_theta", None), ("rms_norm_eps", None), ("rms_norm_eps", "1e-5"), ("rope_scaling", [1, 2]),
    ("rope_scaling", "linear"), ("rope_parameters", [1]), ("head_dim", True),
])
def test_config_values_of_the_wrong_type_name_the_field_and_the_file(tmp_path, field, value):
    """Truthy strings tied the head or added biases, 0 KV heads became multi-head, true became 1.0;
    null or a string escaped as a TypeError without the file."""
    (tmp_path / "config.json").write_text(json.dumps({**SMALL.to_hf_dict(), field: value}))
    with pytest.raises(ValueError, match=field) as e:
        ModelConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), field: value})


@pytest.mark.parametrize("key, value", [
    ("low_freq_factor", None), ("low_freq_factor", "1"), ("high_freq_factor", "4"),
    ("original_max_position_embeddings", None), ("original_max_position_embeddings", "8192"),
    ("original_max_position_embeddings", 64.5), ("factor", True),
])
def test_llama3_rope_scaling_values_are_numbers(tmp_path, key, value):
    """A null or string bound failed in the comparison as "'<' not supported"."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, key: value}
    (tmp_path / "config.json").write_text(json.dumps({**SMALL.to_hf_dict(), "rope_scaling": scaling}))
    with pytest.raises(ValueError, match=key if key != "factor" else "'factor'") as e:
        ModelConfig.from_json(tmp_path)
    assert "config.json" in str(e.value)


def test_missing_kv_heads_is_multi_head():
    d = SMALL.to_hf_dict()
    assert ModelConfig.from_hf_dict({**d, "num_key_value_heads": None}).num_key_value_heads == 4
    del d["num_key_value_heads"]
    assert ModelConfig.from_hf_dict(d).num_key_value_heads == 4


def test_a_stray_safetensors_file_is_not_merged(tmp_path):
    """Every *.safetensors was merged, later files overwriting earlier ones: a backup of zeros loaded."""
    m = checkpoint(tmp_path)
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(zeros, str(tmp_path / "zz-backup.safetensors"))
    with pytest.warns(UserWarning, match="zz-backup"):
        back = load(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(IDS), m(IDS))
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="several safetensors files"):
        load(tmp_path)


def test_an_index_names_exactly_the_files_read(tmp_path):
    m = checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-1.safetensors": keys[:8], "model-2.safetensors": keys[8:]}
    for f, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / f))
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, str(tmp_path / "zz-backup.safetensors"))
    with torch.no_grad():
        assert torch.equal(load(tmp_path)(IDS), m(IDS))             # the backup is not read
    bad = {
        "[1, 2]": "weight_map", "{not json": "not valid JSON",
        json.dumps({"weight_map": {keys[0]: 3}}): "file names",
        json.dumps({"weight_map": {keys[0]: "../model-1.safetensors"}}): "file names",
        json.dumps({"weight_map": {**weight_map, keys[0]: "gone.safetensors"}}): "gone.safetensors",
        json.dumps({"weight_map": {**weight_map, keys[0]: "model-2.safetensors"}}): "lack them",
    }
    for text, match in bad.items():
        index.write_text(text)
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            load(tmp_path)
        assert str(tmp_path) in str(e.value)
    save_file({k: state[k] for k in keys[:9]}, str(tmp_path / "model-1.safetensors"))  # keys[8] in both
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model-1.safetensors and model-2.safetensors"):
        load(tmp_path)


def test_tensors_of_the_wrong_shape_or_dtype_are_named(tmp_path):
    """A wrong shape was load_state_dict's RuntimeError; an integer tensor loaded (and skipped the
    mixed-dtype check)."""
    checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(str(path))
    name = "model.layers.1.mlp.up_proj.weight"
    for tensor, match in ((torch.zeros(64, 31), r"up_proj.weight is \(64, 31\), the config wants \(64, 32\)"),
                          (good[name].to(torch.int32), r"up_proj.weight \(torch.int32\)"),
                          (good[name] > 0, r"up_proj.weight \(torch.bool\)")):
        save_file({**good, name: tensor}, str(path))
        with pytest.raises(ValueError, match=match) as e:
            load(tmp_path)
        assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"garbage, not a header", b"\xff" * 8])
def test_a_corrupt_safetensors_file_is_named(tmp_path, content):
    checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load(tmp_path)


def bad_checkpoints(root):
    """(folder, what the one error line says) for each kind of bad checkpoint above."""
    cases = []

    def case(name, match, edit):
        folder = root / name
        checkpoint(folder)
        for f in (DATA_DIR / "tokenizer").iterdir():
            shutil.copy(f, folder)
        edit(folder)
        cases.append((folder, match))

    case("eos", "eos_token_id", lambda f: edit_config(f, eos_token_id=[64]))
    case("theta", "rope_theta", lambda f: edit_config(f, rope_theta=None))
    case("scaling", "rope_type", lambda f: edit_config(f, rope_scaling={"factor": 4.0}))
    case("json", "not valid JSON", lambda f: (f / "config.json").write_text("{oops"))
    case("index", "weight_map", lambda f: (f / "model.safetensors.index.json").write_text("[1]"))
    case("empty", "not a readable safetensors", lambda f: (f / "model.safetensors").write_bytes(b""))
    case("shape", "the config wants", lambda f: edit_config(f, intermediate_size=48))
    case("int", "non-float", lambda f: save_file(
        {k: v.long() for k, v in load_file(str(f / "model.safetensors")).items()}, str(f / "model.safetensors")))
    # no tokenizer and a bad config: the tokenizer is looked for before the model loads
    case("no-tokenizer", "has no tokenizer", lambda f: [edit_config(f, rope_theta=None)] +
         [(f / t).unlink() for t in ("tokenizer.json", "tokenizer_config.json")])
    return cases


def test_cli_prints_one_line_for_each_bad_checkpoint(tmp_path, capsys):
    for folder, match in bad_checkpoints(tmp_path):
        with pytest.raises(SystemExit) as e:
            cli.main(["perplexity", "--model", str(folder), "--device", "cpu", "--windows", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, (folder.name, err)
        assert err.startswith("llmops-lab perplexity: error:") and str(folder) in err


# -- read as transformers 5 reads it: logits against its own, on configs edited by hand ----------
def against_transformers(folder):
    from transformers import AutoModelForCausalLM
    ours = load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return ours, (theirs(IDS).logits - ours(IDS)).abs().max().item()


@pytest.mark.parametrize("fields", [
    # Llama 3 RoPE without its pretraining length: transformers takes the config's context, not 8192
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0}, "max_position_embeddings": 16},
    # ... and a top-level original_max_position_embeddings before the one in the dict
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     "original_max_position_embeddings": 8},
    {"rope_theta": 1234.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},  # the dict's wins
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}},          # theta in rope_scaling
    {"sliding_window": 4},                       # transformers' Llama never windows: the key is ignored
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},   # the same as plain RoPE inside the context
    {"hidden_act": "swish"},                     # transformers' other name for SiLU
])
def test_rope_and_config_keys_are_read_as_transformers_reads_them(tmp_path, fields):
    """Each of these loaded here and gave other logits than transformers' (or was refused)."""
    checkpoint(tmp_path)
    edit_config(tmp_path, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the ignored sliding_window says so
        _, gap = against_transformers(tmp_path)
    assert gap < 1e-4


def test_a_llama_sliding_window_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="sliding_window 4 but model_type 'llama'"):
        assert ModelConfig.from_hf_dict({**SMALL.to_hf_dict(), "sliding_window": 4}).sliding_window is None
    mistral = {**dataclasses.replace(SMALL, model_type="mistral").to_hf_dict(), "sliding_window": 4}
    assert ModelConfig.from_hf_dict(mistral).sliding_window == 4


def test_a_head_that_differs_from_the_tied_embeddings_is_kept(tmp_path):
    """config.json says tie, the checkpoint has its own trained lm_head: it was dropped without a
    word and every logit changed; transformers keeps it (and warns), and so does this loader now."""
    checkpoint(tmp_path)
    edit_config(tmp_path, tie_word_embeddings=True)
    with pytest.warns(UserWarning, match="own lm_head.weight"):
        ours, gap = against_transformers(tmp_path)
    assert gap < 1e-4 and not ours.config.tie_word_embeddings
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()


def test_generation_config_eos_is_where_generate_stops(tmp_path):
    """Llama-3-Instruct's end-of-turn token is in generation_config.json only; transformers stops there."""
    checkpoint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], "bos_token_id": 0}))
    assert load(tmp_path).config.eos_token_ids == (1, 5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))   # no eos: config.json's
    assert load(tmp_path).config.eos_token_ids == (1,)
    (tmp_path / "generation_config.json").write_text("[1, 5]")
    with pytest.raises(ValueError, match="generation_config.json"):
        load(tmp_path)


def test_qwen2_has_its_biases_whatever_attention_bias_says(tmp_path):
    """transformers' Qwen2 always has q/k/v biases; attention_bias false made this loader refuse the
    checkpoint ("unexpected ['...k_proj.bias']")."""
    checkpoint(tmp_path, dataclasses.replace(SMALL, model_type="qwen2", attention_bias=True))
    edit_config(tmp_path, attention_bias=False)
    ours, gap = against_transformers(tmp_path)
    assert ours.config.attention_bias and gap < 1e-4
