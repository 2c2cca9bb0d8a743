"""Speculative decoding: a cheap draft proposes, the target verifies k tokens in one pass."""
from .as_written import DocumentSpeculativeDecoder
from .decoder import SpeculativeDecoder, SpeculativeStats

__all__ = ["DocumentSpeculativeDecoder", "SpeculativeDecoder", "SpeculativeStats"]
