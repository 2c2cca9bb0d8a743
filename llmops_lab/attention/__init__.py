"""Attention implementations, each a backend the runtime can plug in.

A backend is a function ``(q, k, v, mask, is_causal) -> out`` with q of shape [B, H, Sq, D] and
k, v of shape [B, Hkv, Sk, D] (grouped-query: H is a multiple of Hkv); ``mask`` is a boolean
[B, 1, Sq, Sk] tensor (True = may attend) or None, in which case ``is_causal`` says whether
query i sees keys 0..i (Sq == Sk) or every key.
"""
from .backends import BACKENDS, get_backend, naive_attention, sdpa_attention

__all__ = ["BACKENDS", "get_backend", "naive_attention", "sdpa_attention"]
