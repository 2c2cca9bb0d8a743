"""Attention implementations, each a backend the runtime can plug in.

A backend is a function ``(q, k, v, mask, is_causal) -> out`` with q of shape [B, H, Sq, D] and
k, v of shape [B, Hkv, Sk, D] (grouped-query: H is a multiple of Hkv); ``mask`` is a boolean
[B, 1, Sq, Sk] tensor (True = may attend) or None, in which case ``is_causal`` says whether
query i sees keys 0..i + Sk - Sq or every key. Causal attention is aligned bottom right in every
backend: with Sq == Sk query i sees keys 0..i; with fewer queries than keys (new queries after a
cached prefix) the last query sees every key; more queries than keys is refused (rows with no key).
PyTorch's own ``is_causal`` aligns top left, so ``sdpa_attention`` builds the mask when Sq < Sk.
Every backend requires one floating dtype for q, k and v (flash: fp16, bf16 or fp32). Backends by
name (``get_backend``): "naive", "sdpa", "cpu_decode", "flash" (the Triton kernel) and "tiled"
(the PyTorch loop of ``tiled.py``); the last two apply no explicit mask.
"""
from .backends import BACKENDS, get_backend, naive_attention, sdpa_attention

__all__ = ["BACKENDS", "get_backend", "naive_attention", "sdpa_attention"]
