"""The small ops of a decoder layer as one Triton kernel each, as vLLM fuses them: ``rms_norm``,
``fused_add_rms_norm``, ``silu_and_mul``, ``rotary_embedding``; and ``decoder_layer``, the layer
computed with them.

What they teach: in a decode step the matmuls stream the weights, and everything between them is
elementwise work on a few [tokens, hidden] rows. Eager PyTorch runs each elementwise operation as
its own kernel that reads and writes the whole tensor: ``RMSNorm`` in bf16 is eight (cast, square,
mean, add, rsqrt, multiply, cast, scale), rotary embedding five per tensor (negate, concatenate,
two products, a sum), SwiGLU's gate two, a residual add one. At a batch of 16 tokens each costs
a few microseconds of GPU time, however little it computes: in the H100 profile of a graphed 7B
decode step (``engine.profile``, 2026-11-26) the top rows alone show about 580 such kernels a step
taking about 2 ms of its 8.9 ms of device time, beside 5.3 ms of matmuls. Fused, a layer's ~30
elementwise kernels become six, each reading its inputs once and writing its outputs once.

The references are the readable modules of ``model.py`` (``RMSNorm``, ``apply_rope``, ``MLP``,
``DecoderLayer``), and the kernels round where PyTorch rounds: in bf16 the normalised row is cast
to bf16 before the weight scales it, and rotary's two products are rounded before their sum. Sums
over a row run in a different order (and ``exp`` and ``sqrt`` are the GPU's own), so results agree
within an ulp or two of the activations' dtype, not bit for bit. Runs on a CPU under
TRITON_INTERPRET=1 (``tests/test_fused_ops.py``); the engine uses them in its captured graphs only
when asked (``EngineConfig(fused_ops=True)``), until a GPU has timed them.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; only these kernels need it
    triton = None

from .paged.triton_paged import available  # noqa: F401  (one rule for every kernel: CUDA or the interpreter)


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, d_ptr, r_ptr, w_ptr, y_ptr, N, eps,
                         stride_x, stride_d, stride_r, stride_y,
                         ADD: tl.constexpr, BLOCK: tl.constexpr):
        """One row: y = w * cast(x / rms(x)); with ADD, x is first x + d, rounded to its dtype and
        stored at r (the new residual)."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0)
        if ADD:
            d = tl.load(d_ptr + row * stride_d + offs, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(r_ptr + row * stride_r + offs, x, mask=m)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
        normed = (xf * rstd).to(x.dtype).to(tl.float32)            # RMSNorm casts back, then scales
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_and_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """y = silu(g) * u elementwise; silu(g) is rounded to the dtype first, as F.silu returns it."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + offs, (s * u).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, S, HALF,
                       stride_xb, stride_xh, stride_xs, stride_cb, stride_cs,
                       BLOCK: tl.constexpr):
        """In place, one (batch, position, head) row of x: [x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2]
        (Hugging Face's half-split layout: rotate_half(x) = [-x2, x1]), each product rounded to the
        dtype before the sum as ``x * cos + rotate_half(x) * sin`` rounds them."""
        bs, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        b, s = bs // S, bs % S
        offs = tl.arange(0, BLOCK)
        m = offs < HALF
        row = x_ptr + b * stride_xb + h * stride_xh + s * stride_xs
        trig = b * stride_cb + s * stride_cs
        x1 = tl.load(row + offs, mask=m, other=0.0)
        x2 = tl.load(row + HALF + offs, mask=m, other=0.0)
        dt = x1.dtype
        c1 = tl.load(cos_ptr + trig + offs, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + trig + HALF + offs, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + trig + offs, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + trig + HALF + offs, mask=m, other=0.0).to(tl.float32)
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(row + offs, y1.to(dt), mask=m)
        tl.store(row + HALF + offs, y2.to(dt), mask=m)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as [rows, N] with unit stride along N (a view where it can be)."""
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(t.shape)}")
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed")
    dev, dt = tensors[0].device, tensors[0].dtype
    if not available(dev):
        raise RuntimeError(f"the fused ops run on CUDA or under TRITON_INTERPRET=1, not on {dev}")
    if any(t.device != dev or t.dtype != dt for t in tensors):
        raise ValueError("the fused ops take tensors of one device and one dtype, got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the fused ops take fp16, bf16 or fp32, got {dt}")


def _norm(x, delta, weight, eps: float):
    _check(x, weight, *(() if delta is None else (delta,)))
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows of {N}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and x {tuple(x.shape)} differ")
    x2 = _rows(x, "x")
    d2 = x2 if delta is None else _rows(delta, "delta")
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    r = torch.empty_like(y) if delta is not None else y
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(x2.shape[0],)](x2, d2, r, weight, y, N, eps, x2.stride(0), d2.stride(0),
                                         r.stride(0), y.stride(0), ADD=delta is not None, BLOCK=block,
                                         num_warps=min(16, max(1, block // 256)))
    return r.view(x.shape), y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` (model.py) of x [..., N] with ``weight`` [N], in one kernel."""
    return _norm(x, None, weight, eps)[1]


def fused_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one kernel: the residual add that ends a sublayer and
    the norm that starts the next."""
    return _norm(x, delta, weight, eps)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` (SwiGLU's gate) in one kernel."""
    _check(gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n, block = g.numel(), 1024
    if n:
        _silu_and_mul_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block)
    return y


def rotary_embedding_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` (model.py) in place on x [B, H, S, D] (any strides with a unit last one: the
    transposed view a projection's output is read through) for cos, sin [B, S, D]; returns x."""
    _check(x, cos, sin)
    if x.dim() != 4 or cos.shape != sin.shape or cos.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"x must be [B, H, S, D] and cos, sin [B, S, D]; got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    B, H, S, D = x.shape
    if D % 2 or x.stride(-1) != 1:
        raise ValueError(f"the head dim must be even and contiguous, got D={D}, stride {x.stride(-1)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if x.numel():
        _rotary_kernel[(B * S, H)](x, cos, sin, S, D // 2, x.stride(0), x.stride(1), x.stride(2),
                                   cos.stride(0), cos.stride(1), BLOCK=triton.next_power_of_2(D // 2))
    return x


def decoder_layer(layer, x, cos, sin, cache, start, mask, is_causal, backend):
    """``DecoderLayer.forward`` (model.py) with the fused ops: norm, projections, rotary in place,
    attention, then the residual add and the second norm in one kernel, and SwiGLU's gate in one."""
    a, mlp = layer.self_attn, layer.mlp
    q, k, v = a.project(rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.eps))
    rotary_embedding_(q, cos, sin)
    rotary_embedding_(k, cos, sin)
    x, h = fused_add_rms_norm(x, a.attend(q, k, v, cache, start, mask, is_causal, backend),
                              layer.post_attention_layernorm.weight, layer.post_attention_layernorm.eps)
    return x + mlp.down_proj(silu_and_mul(mlp.gate_proj(h), mlp.up_proj(h)))
