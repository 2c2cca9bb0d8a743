"""Tests for llmops_lab.device: guarded, cached capability probes and the CPU fallback message."""
import pytest
import torch

from llmops_lab import device

KEYS = {"python", "torch", "cuda", "device_name", "compute_capability", "gpu_memory_bytes",
        "cpu_threads", "triton", "triton_gpu", "triton_interpret", "sdpa_backends",
        "bitsandbytes", "flash_attn", "transformers"}


def test_capabilities_has_every_key_and_consistent_values():
    caps = device.capabilities()
    assert set(caps) == KEYS
    assert caps["cuda"] == torch.cuda.is_available()
    assert caps["torch"] == torch.__version__
    assert caps["cpu_threads"] >= 1
    assert set(caps["sdpa_backends"]) == {"math", "efficient", "flash", "cudnn"}
    assert caps["sdpa_backends"]["math"]  # the reference backend runs everywhere
    if not caps["cuda"]:
        assert caps["compute_capability"] is None and caps["gpu_memory_bytes"] is None
        assert caps["triton_gpu"] is False


def test_capabilities_is_cached_and_returns_copies():
    caps = device.capabilities()
    caps["cuda"] = "edited"
    caps["sdpa_backends"]["math"] = "edited"
    fresh = device.capabilities()
    assert fresh["cuda"] != "edited" and fresh["sdpa_backends"]["math"] is True
    assert device._probe.cache_info().hits >= 1


def test_describe_is_a_short_summary():
    text = device.describe()
    assert torch.__version__ in text and "SDPA" in text
    assert 3 <= len(text.splitlines()) <= 8


def test_default_device():
    assert device.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_fallback_message(capsys):
    message = device.fallback_message("the KV-cache benchmark")
    if torch.cuda.is_available():
        assert message is None
        assert device.notify_fallback("x") is None
    else:
        assert "the KV-cache benchmark runs on the CPU" in message
        assert "python -m llmops_lab.bench --device cuda" in message
        device.notify_fallback("the KV-cache benchmark")
        assert capsys.readouterr().out.strip() == message


def test_as_device_takes_cpu_and_cuda_only():
    """'meta' loaded a model with no weights (generate then failed far away); 'mps' and 'xpu' passed."""
    import torch
    from llmops_lab.device import as_device
    assert as_device("cpu") == torch.device("cpu") and as_device(torch.device("cpu")).type == "cpu"
    for bad in ("meta", "mps", "xpu", "gpu", 3.5):
        with pytest.raises(ValueError, match="device"):
            as_device(bad)
