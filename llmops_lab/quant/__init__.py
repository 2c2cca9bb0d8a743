"""Weight quantization: round-to-nearest, GPTQ, AWQ, bitsandbytes and GGUF, on one weight format."""
from .awq import AWQConfig, awq_quantize_model
from .calibration import as_calibration_ids, embedded_calibration
from .gguf import check_gguf, export_gguf, read_gguf, requantize
from .gptq import GPTQConfig, gptq_quantize_model
from .packing import pack_codes, pack_int4, unpack_codes, unpack_int4
from .quant_linear import QuantLinear, quantize
from .rtn import check_error_bound, quantize_rtn
from .weights import QuantizedWeight

__all__ = ["AWQConfig", "GPTQConfig", "awq_quantize_model", "gptq_quantize_model", "QuantizedWeight", "QuantLinear", "quantize", "quantize_rtn", "check_error_bound",
           "as_calibration_ids", "embedded_calibration", "export_gguf", "check_gguf", "read_gguf", "requantize",
           "pack_int4", "unpack_int4", "pack_codes", "unpack_codes"]
