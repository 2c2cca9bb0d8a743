"""Continuous batching on the paged KV cache: the serving engine, its bookkeeping and its interface.

Plain-Python bookkeeping (``Sequence``, ``BlockManager``, ``Scheduler``), the one tensor-touching
part (``ModelRunner``), the engine (``LLMEngine``: add_request / step / abort) and vLLM's offline
interface (``LLM``, ``SamplingParams``). Torch-dependent modules load on first use, so the
bookkeeping imports without them.
"""
from .block_manager import Block, BlockManager, NoFreeBlocksError
from .config import EngineConfig
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence, SequenceStatus

__all__ = ["Block", "BlockManager", "NoFreeBlocksError", "Sequence", "SequenceStatus", "EngineConfig",
           "SamplingParams", "RequestOutputKind", "Scheduler", "ScheduledBatch", "CompletionOutput", "RequestMetrics",
           "RequestOutput", "LLMEngine", "LLM", "ModelRunner"]


def __getattr__(name):
    if name == "LLMEngine":
        from .llm_engine import LLMEngine
        return LLMEngine
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "ModelRunner":
        from .model_runner import ModelRunner
        return ModelRunner
    raise AttributeError(name)
