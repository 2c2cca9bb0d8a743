"""``llmops-lab kv``: int8 with its scales, non-torch memory, vLLM's prefill chunk, and the caveats."""
import pytest

from llmops_lab import cli
from llmops_lab.kv import Int8KVCache, kv_cache_budget
from llmops_lab.kv.calculator import GPU_MEMORY, KV_CACHE_DTYPES
from llmops_lab.presets import get_preset

H100 = GPU_MEMORY["H100 80GB"]


def run(capsys, *argv) -> str:
    cli.main(["kv", *argv])
    return capsys.readouterr().out


def test_int8_is_sized_as_int8kvcache_stores_it(capsys):
    c = get_preset("qwen2.5-0.5b")
    out = run(capsys, "qwen2.5-0.5b", "--kv-dtype", "int8")
    meta = Int8KVCache(c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim, 1, device="meta")
    assert meta.nbytes == 6336
    assert f"{6336 / 1024:.1f} KiB (int8: 2 x 24 x 2 x (64 x 1 + 2) bytes" in out and "192 bytes of scales" in out
    want = kv_cache_budget(c, H100, 0.9, weight_bytes=c.num_parameters() * 2, **KV_CACHE_DTYPES["int8"])
    assert want.bytes_per_token == 6336 and want.log_line() in out
    fp8 = run(capsys, "qwen2.5-0.5b", "--kv-dtype", "fp8")
    assert "6.0 KiB (fp8: 2 x 24 x 2 x 64 x 1 bytes)" in fp8 and "scales" not in fp8


def test_upper_bound_notes_and_the_options_that_remove_them(capsys):
    out = run(capsys, "llama-2-7b")
    assert "upper bounds: vLLM also subtracts its profiled activations" in out and "non-torch" in out
    assert "prefill chunk" not in out                                     # no sliding window
    out = run(capsys, "llama-2-7b", "--activation-gib", "2", "--non-torch-gib", "1")
    assert "upper bounds" not in out and "non-torch        1.00 GiB" in out
    want = kv_cache_budget("llama-2-7b", H100, 0.9, activation_bytes=2 * 2**30, non_torch_bytes=2**30)
    assert want.log_line() in out
    out = run(capsys, "mistral-7b")
    assert "holds 257 blocks" in out and "without --max-num-batched-tokens the chunk is left out" in out
    out = run(capsys, "mistral-7b", "--max-num-batched-tokens", "8192")
    assert "prefill chunk of up to 8,192 tokens (vLLM v1's count) it holds 769 blocks" in out
    assert kv_cache_budget("mistral-7b", H100, 0.9, max_num_batched_tokens=8192).log_line() in out
    assert "chunk is left out" not in out


@pytest.mark.parametrize("argv", [["--non-torch-gib", "-1"], ["--non-torch-gib", "nan"],
                                  ["--max-num-batched-tokens", "0"], ["--max-num-batched-tokens", "2.5"],
                                  ["--non-torch-gib", "80"]])
def test_bad_values_are_one_line_errors(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["kv", "llama-2-7b", *argv])
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_help_states_the_differences_from_vllm(capsys):
    with pytest.raises(SystemExit):
        cli.main(["kv", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("upper bounds", "outside PyTorch", "cdiv(min(W - 1 + max_num_batched_tokens, max_model_len), "
                   "block_size) + 1", "per-tensor scales", "Int8KVCache"):
        assert phrase in text, phrase


def test_a_window_longer_than_the_request_frees_nothing(capsys):
    """Mistral's 4,096-token window over a 2,048-token request: nothing leaves the window, so the
    line says so, and gives vLLM v1's count (the full blocks and the one a window may straddle)."""
    out = run(capsys, "mistral-7b", "--max-model-len", "2048", "--max-num-batched-tokens", "8192")
    line = next(l for l in out.splitlines() if l.startswith("KV per sequence"))
    assert "covers the whole request" in line and "129 blocks" in line and "are freed" not in line


def test_splitting_over_gpus_is_suggested_only_when_the_weights_do_not_fit():
    with pytest.raises(ValueError) as e:          # 13 GB of weights fit; the non-torch memory does not
        kv_cache_budget("llama-2-7b", GPU_MEMORY["H100 80GB"], non_torch_bytes=80 * 2**30)
    assert "tensor_parallel_size" not in str(e.value)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        kv_cache_budget("llama-2-70b", GPU_MEMORY["H100 80GB"])
