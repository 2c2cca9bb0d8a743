"""Weight quantization: round-to-nearest, GPTQ, AWQ, bitsandbytes and GGUF, on one weight format."""
from .weights import QuantizedWeight

__all__ = ["QuantizedWeight"]
