"""KV caches: the keys and values of past tokens, kept so decoding never recomputes them."""
from .cache import KVCache

__all__ = ["KVCache"]
