"""The fused elementwise kernels (``fused_ops``) against the readable modules of ``model.py``, under
TRITON_INTERPRET=1 on a CPU (``scripts/test`` sets it without a GPU): each op, odd sizes and
strided views, every dtype, and a whole decoder layer and packed forward."""
import pytest
import torch
import torch.nn.functional as F

from llmops_lab import fused_ops
from llmops_lab.config import ModelConfig
from llmops_lab.model import RMSNorm, apply_rope

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not fused_ops.available(DEV),
                                reason="needs CUDA or TRITON_INTERPRET=1 (scripts/test sets it without a GPU)")
# within an ulp or two of the dtype: the kernels sum a row in another order than PyTorch does
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 3, 100), (5, 256)])
def test_rms_norm_and_fused_add_match_rmsnorm(dtype, shape):
    norm = RMSNorm(shape[-1], 1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(shape[-1], seed=1))
    x, d = rand(*shape, dtype=dtype, seed=2), rand(*shape, dtype=dtype, seed=3)
    with torch.inference_mode():
        close(fused_ops.rms_norm(x, norm.weight, norm.eps), norm(x), dtype)
        r, y = fused_ops.fused_add_rms_norm(x, d, norm.weight, norm.eps)
        close(r, x + d, dtype)                        # (bit for bit on a GPU; the interpreter's
        close(y, norm(x + d), dtype)                  # bf16 casts need not round to nearest)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_swiglu_gate(dtype):
    g, u = rand(3, 7, 1030, dtype=dtype, seed=4), rand(3, 7, 1030, dtype=dtype, seed=5)   # past one block
    close(fused_ops.silu_and_mul(g, u), F.silu(g) * u, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, S, D", [(1, 4, 1, 32), (2, 3, 5, 64), (1, 2, 3, 12)])   # D/2 not a power of two
def test_rotary_in_place_matches_apply_rope(dtype, B, H, S, D):
    """On the transposed view of a projection's output, as the attention layer holds q and k."""
    proj = rand(B, S, H * D, dtype=dtype, seed=6)
    x = proj.view(B, S, H, D).transpose(1, 2)
    ang = rand(B, S, D // 2, seed=7)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    want = apply_rope(x, cos, sin)
    got = fused_ops.rotary_embedding_(x, cos, sin)
    assert got.data_ptr() == proj.data_ptr()          # written in place
    close(got, want, dtype)


def test_bad_input_is_refused():
    x = rand(2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused_ops.rms_norm(x, rand(7), 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        fused_ops.rms_norm(x, rand(8, dtype=torch.float16), 1e-5)
    with pytest.raises(ValueError, match="differ"):
        fused_ops.silu_and_mul(x, rand(2, 9))
    with pytest.raises(ValueError, match=r"\[B, H, S, D\]"):
        fused_ops.rotary_embedding_(rand(2, 3, 4), rand(2, 4), rand(2, 4))
    with pytest.raises(ValueError, match="even"):
        fused_ops.rotary_embedding_(rand(1, 1, 2, 5), rand(1, 2, 5), rand(1, 2, 5))
    with pytest.raises(TypeError, match="fp16, bf16 or fp32"):
        fused_ops.silu_and_mul(x.double(), x.double())
    if DEV.type == "cpu":
        import os
        os.environ.pop("TRITON_INTERPRET")
        try:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                fused_ops.rms_norm(x, rand(8), 1e-5)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_fused_matches_the_modules(random_llama, dtype):
    """A whole packed forward (every layer through ``decoder_layer``, the final norm fused) against
    the readable layers: logits within the dtype's tolerance, the same greedy tokens in fp32."""
    from llmops_lab.attention import sdpa_attention
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = random_llama(cfg).to(DEV, dtype)

    class Causal:                      # a packed "cache" of one prompt attending to itself
        packed, length = True, 0

        def update(self, layer, k, v, start=None):
            return k, v

    backend = lambda q, k, v, mask, is_causal: sdpa_attention(q, k, v, is_causal=True)
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(8)).to(DEV)
    pos = torch.arange(11, device=DEV)[None]
    with torch.inference_mode():
        ref = model.forward_packed(ids, pos, Causal(), backend)
        got = model.forward_packed(ids, pos, Causal(), backend, fused=True)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype] * 4, atol=TOL[dtype] * 4)
    if dtype == torch.float32:
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
